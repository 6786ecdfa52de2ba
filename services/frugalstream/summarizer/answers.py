"""Keeps what a call answered: each distinct item's summary (or terminal error), fanned out to its near-duplicate
members, with the call's usage record, in one store transaction; the pack and batch runners share it. Only the
summary made for an item's own text is stored for reuse by later jobs; a member's borrowed one is not.

A result is handed to the store in the same step in which it arrives (no await before the write is submitted),
and the write is shielded, so a cancelled summarizer never has paid for an answer it did not keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from frugalstream.llm.providers import Completion
from frugalstream.llm.providers.base import ProviderError
from frugalstream.llm.resilience import FinalProviderError
from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import TokenUsage
from frugalstream.summarizer.accounting import Covered, usage_record
from frugalstream.summarizer.packing import parse_packed, single_messages
from frugalstream.summarizer.plan import JobView, Plan
from frugalstream.summarizer.store import NewResult, SummaryStore

CallResult = Completion | ProviderError | FinalProviderError


@dataclass
class Answers:
    db: SummaryStore
    counter: TokenCounter = field(default_factory=TokenCounter)

    def covered(self, view: JobView, digest: str, summary: str, members: Sequence[str],
                single: TokenUsage | None = None) -> Covered:
        """One distinct item as a single call, and every original item it answers (near members with their text)."""
        out_tokens = self.counter.count_text(summary, view.model)

        def alone(d: str) -> TokenUsage:
            prompt = single_messages(view.job.instruction, view.text(d))
            return TokenUsage(input_tokens=self.counter.count_messages(prompt, view.model), output_tokens=out_tokens)

        own = single or alone(digest)
        copies = own.scaled(len(view.groups[digest]))
        for m in members:
            copies = copies + alone(m).scaled(len(view.groups[m]))
        return Covered(single=own, copies=copies, items=len(view.groups[digest]) + sum(len(view.groups[m])
                                                                                      for m in members))

    async def record_reuse(self, view: JobView, plan: Plan) -> None:
        """The summaries the plan reuses from the store, as one unpaid call `reuse`. A summary gone from the store
        since the plan was made (a part planned before an upgrade changed `PROMPT_VERSION`, and redelivered) is an
        error result naming why, never a silently missing one: the plan has no call that would answer it."""
        stored = await self.db.lookup(view.scope, list(plan.reuse))
        covered = [self.covered(view, d, s.summary, ()) for d, s in stored.items()]
        record = usage_record(view.job, view.key, "reuse", model=view.model, baseline_model=view.baseline,
                              covered=covered, actual=None, packed=False, batch=False,
                              simulated=any(s.simulated for s in stored.values()))
        results = [NewResult(d, s.summary, None, s.item_id) for d, s in stored.items()]
        gone = [d for d in plan.reuse if d not in stored]
        results += [NewResult(d, None, "stored summary no longer reusable (summarizer upgraded): submit it again",
                              view.first_id(d)) for d in gone]
        await self.db.record_call(job_key=view.key, job_id=view.job.job_id, tenant=view.job.tenant, call_id="reuse",
                                  scope=view.scope, model=view.model, simulated=record.simulated, results=results,
                                  items=record.items + sum(len(view.groups[d]) for d in gone), paid=False,
                                  usage=record.model_dump_json(), actual=None)

    async def accept(self, view: JobView, plan: Plan, call_id: str, digests: Sequence[str], result: CallResult, *,
                     batch: bool) -> list[str]:
        """Persists what `result` answered; returns the digests still unanswered, to be retried alone."""
        if not isinstance(result, Completion):
            if len(digests) == 1:
                await self._persist(view, plan, call_id, {}, {digests[0]: str(result)[:500]}, None, False, False)
                return []
            return list(digests)
        packed = len(digests) > 1
        if packed:
            local = {str(i + 1): d for i, d in enumerate(digests)}
            parsed = parse_packed(result.content, list(local), max_chars=view.job.max_output_tokens * 8,
                                  truncated=result.finish_reason == "length")
            good = {local[k]: v for k, v in parsed.good.items()}
        else:
            text = result.content.strip()
            good = {digests[0]: text} if text else {}
        errors = {} if packed or good else {digests[0]: "empty answer"}
        await self._persist(view, plan, call_id, good, errors, result, packed, batch)
        return [d for d in digests if d not in good and d not in errors]

    async def unanswered(self, view: JobView, plan: Plan, call_id: str) -> None:
        """Call `call_id` made, answering nothing (a batch that failed or expired for its pack): unpaid, no
        result, so its items are retried alone at the standard rate and never submitted in another batch."""
        await self._persist(view, plan, call_id, {}, {}, None, False, True)

    async def _persist(self, view: JobView, plan: Plan, call_id: str, good: dict[str, str], errors: dict[str, str],
                       result: Completion | None, packed: bool, batch: bool) -> None:
        members = plan.members()
        results: list[NewResult] = []
        covered: list[Covered] = []
        for d, summary in good.items():
            single = result.usage if result is not None and not packed else None
            covered.append(self.covered(view, d, summary, members.get(d, ()), single))
            results.append(NewResult(d, summary, None, view.first_id(d)))
            # A member borrows the representative's summary for this job only (see `NewResult.reusable`).
            results += [NewResult(m, summary, None, view.first_id(d), reusable=False) for m in members.get(d, ())]
        for d, error in errors.items():
            results += [NewResult(x, None, error, view.first_id(d)) for x in (d, *members.get(d, ()))]
        items = sum(len(view.groups[r.digest]) for r in results)
        usage = actual = None
        if result is not None:
            record = usage_record(view.job, view.key, call_id, model=view.model, baseline_model=view.baseline,
                                  covered=covered, actual=result.usage, packed=packed, batch=batch,
                                  simulated=result.simulated)
            usage, actual = record.model_dump_json(), result.usage.model_dump_json()
        await self.db.record_call(job_key=view.key, job_id=view.job.job_id, tenant=view.job.tenant, call_id=call_id,
                                  scope=view.scope, model=view.model, simulated=bool(result and result.simulated),
                                  results=results, items=items, paid=result is not None, usage=usage, actual=actual)
