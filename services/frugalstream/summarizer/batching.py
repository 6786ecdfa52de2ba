"""Provider batch interfaces behind one small protocol: submit packed requests, poll until they are done.

`OpenAIBatch` is the real Batch API (half price, up to 24 h). `SimulatedBatch` emulates it on the simulated
provider so demos and benches show the strategy: it answers on the first poll, and every answer and usage
record it yields is marked simulated like any other simulated answer.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from frugalstream.llm.providers.base import Completion, Provider, ProviderError
from frugalstream.llm.providers.batch_api import BatchPoll, Results
from frugalstream.llm.providers.openai_batch import BatchRequest, OpenAIBatchClient
from frugalstream.schemas import ChatMessage, SamplingParams

__all__ = ["BatchBackend", "BatchPoll", "OpenAIBatch", "Results", "SimulatedBatch", "chat_body"]


class BatchBackend(Protocol):
    simulated: bool

    async def submit(self, requests: Sequence[BatchRequest], metadata: Mapping[str, str]) -> str: ...

    async def poll(self, batch_id: str, model: str) -> BatchPoll: ...

    async def aclose(self) -> None: ...


def chat_body(model: str, messages: Sequence[ChatMessage], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": 0.0, "max_tokens": max_tokens}


class OpenAIBatch:
    simulated = False

    def __init__(self, client: OpenAIBatchClient) -> None:
        self.client = client

    async def submit(self, requests: Sequence[BatchRequest], metadata: Mapping[str, str]) -> str:
        return await self.client.submit(requests, metadata=metadata)

    async def poll(self, batch_id: str, model: str) -> BatchPoll:
        status = await self.client.get(batch_id)
        if not status.done:
            return BatchPoll(False, status=status.status)
        return BatchPoll(True, await self.client.results(status, model), status.status)

    async def aclose(self) -> None:
        await self.client.aclose()


class SimulatedBatch:
    """Runs the requests on the simulated provider at the first poll; unknown ids (a restart) read as expired."""

    simulated = True

    def __init__(self, provider: Provider, concurrency: int = 16) -> None:
        self.provider = provider
        self._pending: dict[str, Sequence[BatchRequest]] = {}
        self._gate = asyncio.Semaphore(concurrency)

    async def submit(self, requests: Sequence[BatchRequest], metadata: Mapping[str, str]) -> str:
        digest = hashlib.blake2b("|".join(r.custom_id for r in requests).encode(), digest_size=8).hexdigest()
        batch_id = f"simbatch_{digest}"
        self._pending[batch_id] = requests
        return batch_id

    async def _one(self, request: BatchRequest) -> tuple[str, Completion | ProviderError]:
        body = request.body
        messages = tuple(ChatMessage(role=m["role"], content=m["content"]) for m in body["messages"])
        async with self._gate:
            try:
                return request.custom_id, await self.provider.complete(
                    model=str(body["model"]), messages=messages, sampling=SamplingParams(temperature=0.0),
                    max_tokens=int(body["max_tokens"]))
            except ProviderError as exc:
                return request.custom_id, exc

    async def poll(self, batch_id: str, model: str) -> BatchPoll:
        requests = self._pending.pop(batch_id, None)
        if requests is None:
            return BatchPoll(True, {}, "expired")
        return BatchPoll(True, dict(await asyncio.gather(*(self._one(r) for r in requests))), "completed")

    async def aclose(self) -> None:
        self._pending.clear()
