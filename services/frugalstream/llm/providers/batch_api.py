"""Provider batch jobs for ordinary chat requests, behind one protocol: submit, find a lost id, poll, cancel.

The gateway sends deferrable requests through these (`frugalstream.gateway.batch_runner`); the summarizer's
packed backfills use the older `BatchBackend` over the same `OpenAIBatchClient` and `BatchPoll`.

Every job carries our `job_id` to the provider where the provider keeps metadata (OpenAI: the batch's
`metadata`), so a gateway that crashed between creating a batch and recording its id can `find` it again
instead of submitting the same requests twice. `SimulatedBatchJobs` completes a batch `delay_s` after it was
submitted, on the simulated provider (prompt caching included, answers marked simulated).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from frugalstream.llm.prompt_cache import CachePlan
from frugalstream.llm.providers.base import Completion, ProviderError
from frugalstream.llm.providers.openai import OpenAIProvider
from frugalstream.llm.providers.openai_batch import BatchRequest, Estimate, OpenAIBatchClient
from frugalstream.llm.providers.simulated import SimulatedProvider
from frugalstream.schemas import ChatMessage, SamplingParams
from frugalstream.schemas.requests import ToolChoice

Results = dict[str, Completion | ProviderError]
JOB_METADATA_KEY = "frugalstream_job"


@dataclass(frozen=True)
class BatchPoll:
    """`done` with `results` by custom id; a done batch may lack ids (failed/expired lines)."""

    done: bool
    results: Results = field(default_factory=dict)
    status: str = ""


@dataclass(frozen=True)
class BatchCall:
    """One request of a batch, provider-neutral; each backend spells it in its own wire format."""

    custom_id: str
    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    response_format: Mapping[str, Any] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    cache_plan: CachePlan | None = None


def custom_id(key: str) -> str:
    """A batch line id for a request key: Anthropic allows only [A-Za-z0-9_-]{1,64}, and a key is any text."""
    return "r" + hashlib.sha256(key.encode()).hexdigest()[:40]


class BatchJobs(Protocol):
    name: str
    simulated: bool

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        """Creates the batch; returns the provider's batch id."""
        ...

    async def find(self, job_id: str) -> str | None:
        """The batch already created for `job_id`, if the provider can tell (None: none, or it cannot)."""
        ...

    async def poll(self, batch_id: str, model: str, calls: Sequence[BatchCall] = ()) -> BatchPoll:
        """The batch's state, and once done its lines by custom id; `calls` are its requests, what an answer
        that reports no usage is estimated from."""
        ...

    async def cancel(self, batch_id: str) -> None: ...

    async def aclose(self) -> None: ...


class OpenAIBatchJobs:
    """The OpenAI Batch API: bodies as the chat adapter builds them, the job id in the batch's metadata."""

    simulated = False

    def __init__(self, client: OpenAIBatchClient, chat: OpenAIProvider) -> None:
        self.client = client
        self.chat = chat
        self.name = client.name

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        requests = [BatchRequest(c.custom_id, self.chat.build_body(
            model=c.model, messages=c.messages, sampling=c.sampling, max_tokens=c.max_tokens, tools=c.tools,
            response_format=c.response_format, tool_choice=c.tool_choice, parallel_tool_calls=c.parallel_tool_calls,
        )) for c in calls]
        return await self.client.submit(requests, metadata={JOB_METADATA_KEY: job_id})

    async def find(self, job_id: str) -> str | None:
        return await self.client.find(JOB_METADATA_KEY, job_id)

    async def poll(self, batch_id: str, model: str, calls: Sequence[BatchCall] = ()) -> BatchPoll:
        status = await self.client.get(batch_id)
        if not status.done:
            return BatchPoll(False, status=status.status)
        estimates = {c.custom_id: self._estimate(c) for c in calls}
        return BatchPoll(True, await self.client.results(status, model, estimates), status.status)

    def _estimate(self, call: BatchCall) -> Estimate:
        """How a line of `call` without usage is priced: counted from its request, as the chat adapter does."""
        return lambda content, answer_calls: self.chat.estimated(call.model, call.messages, call.tools, content,
                                                                 answer_calls)

    async def cancel(self, batch_id: str) -> None:
        await self.client.cancel(batch_id)

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class _SimBatch:
    job_id: str
    calls: Sequence[BatchCall]
    ready_at: float
    cancelled: bool = False


class SimulatedBatchJobs:
    """Batches on the simulated provider that complete `delay_s` after submission. Held in memory: after a
    restart an unknown id reads as expired, and the gateway answers its requests interactively."""

    simulated = True
    name = "simulated"

    def __init__(self, provider: SimulatedProvider, *, delay_s: float = 5.0, concurrency: int = 16,
                 clock: Callable[[], float] = time.time) -> None:
        self.provider = provider
        self.delay_s = delay_s
        self._clock = clock
        self._batches: dict[str, _SimBatch] = {}
        self._gate = asyncio.Semaphore(concurrency)
        self.submitted: list[str] = []  # batch ids in submission order, for tests and the demo's report

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        batch_id = f"simbatch_{hashlib.blake2b(job_id.encode(), digest_size=8).hexdigest()}"
        if batch_id not in self._batches:
            self._batches[batch_id] = _SimBatch(job_id, list(calls), self._clock() + self.delay_s)
            self.submitted.append(batch_id)
        return batch_id

    async def find(self, job_id: str) -> str | None:
        return next((bid for bid, b in self._batches.items() if b.job_id == job_id), None)

    async def _one(self, call: BatchCall) -> tuple[str, Completion | ProviderError]:
        async with self._gate:
            try:
                return call.custom_id, await self.provider.complete(
                    model=call.model, messages=call.messages, sampling=call.sampling, max_tokens=call.max_tokens,
                    tools=call.tools, response_format=call.response_format, tool_choice=call.tool_choice,
                    parallel_tool_calls=call.parallel_tool_calls, cache_plan=call.cache_plan)
            except ProviderError as exc:
                return call.custom_id, exc

    async def poll(self, batch_id: str, model: str, calls: Sequence[BatchCall] = ()) -> BatchPoll:
        batch = self._batches.get(batch_id)
        if batch is None:
            return BatchPoll(True, {}, "expired")
        if batch.cancelled:
            self._batches.pop(batch_id, None)
            return BatchPoll(True, {}, "cancelled")
        if self._clock() < batch.ready_at:
            return BatchPoll(False, status="in_progress")
        del self._batches[batch_id]
        return BatchPoll(True, dict(await asyncio.gather(*(self._one(c) for c in batch.calls))), "completed")

    async def cancel(self, batch_id: str) -> None:
        if batch_id in self._batches:
            self._batches[batch_id].cancelled = True

    async def aclose(self) -> None:
        self._batches.clear()
