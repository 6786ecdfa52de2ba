"""Runs a plan's packs as standard-rate calls: the packed call (unless a previous delivery already made it), then
each item it left unanswered alone, so one bad section never costs the rest of the pack."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from frugalstream.llm.providers import Completion, Provider
from frugalstream.llm.resilience import BreakerRegistry, FinalProviderError, RetryPolicy, call_with_fallbacks
from frugalstream.schemas import ChatMessage, SamplingParams
from frugalstream.summarizer.answers import Answers
from frugalstream.summarizer.packing import call_messages
from frugalstream.summarizer.plan import JobView, Plan


def request(view: JobView, digests: Sequence[str]) -> tuple[tuple[ChatMessage, ...], int]:
    """The messages and output budget of the call answering `digests` (shared with the batch path)."""
    return call_messages(view.job.instruction, [view.text(d) for d in digests], view.job.max_output_tokens)


@dataclass
class Packs:
    provider: Provider
    answers: Answers
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)

    async def run(self, view: JobView, plan: Plan, n: int, digests: list[str]) -> list[str]:
        """Returns the ids of the calls this made (pack `n` is call `p{n}`, an item retried alone `p{n}.<digest>`)."""
        call_id = f"p{n}"
        done = {c.call_id for c in await self.answers.db.calls(view.key)}
        calls: list[str] = []
        retry = digests
        if call_id not in done:
            retry = await self.answers.accept(view, plan, call_id, digests, await self._call(view, digests),
                                              batch=False)
            calls.append(call_id)
        for d in retry:
            calls.append(await self.alone(view, plan, call_id, d))
        return calls

    async def alone(self, view: JobView, plan: Plan, call_id: str, digest: str) -> str:
        """One item of call `call_id` retried alone at the standard rate; returns the new call's id."""
        single_id = f"{call_id}.{digest}"
        await self.answers.accept(view, plan, single_id, [digest], await self._call(view, [digest]), batch=False)
        return single_id

    async def _call(self, view: JobView, digests: Sequence[str]) -> Completion | FinalProviderError:
        messages, max_tokens = request(view, digests)

        async def call(p: Provider, m: str) -> Completion:
            return await p.complete(model=m, messages=messages,
                                    sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens)

        try:
            return await call_with_fallbacks(lambda _m: self.provider, (view.model,), call, policy=self.policy,
                                             breakers=self.breakers)
        except FinalProviderError as exc:
            return exc
