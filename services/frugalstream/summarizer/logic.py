"""Summarize a job's distinct items once, packed several per call, and fan results out to every original item.

Per job part: plan (persisted), re-emit what a previous delivery finished but may not have published, then
run the remaining packs a chunk at a time; each call's answer is persisted the moment it arrives and each
chunk's results, usage and progress are published before the next chunk starts. A part that outlives the
handler budget (a slow provider, a batch still running) returns unfinished: the service republishes it as
a continuation, so the consumer never blocks past `max_poll_interval` and the offset still moves only after
the continuation is safely on the topic. A later part of a job waits (as a continuation) while an earlier
part is unfinished, so it reuses that part's answers instead of paying for the same items again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from frugalstream.llm.providers import Completion, Provider
from frugalstream.llm.providers.base import ProviderError
from frugalstream.llm.providers.openai_batch import BatchRequest
from frugalstream.llm.resilience import BreakerRegistry, FinalProviderError, RetryPolicy, call_with_fallbacks
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, SamplingParams, SummarizeJob, TokenUsage
from frugalstream.summarizer.accounting import Covered, usage_record
from frugalstream.summarizer.batching import BatchBackend, chat_body
from frugalstream.summarizer.emit import Emitter
from frugalstream.summarizer.near import NearDuplicates
from frugalstream.summarizer.packing import PACK_OUTPUT_SLACK, pack, packed_messages, parse_packed, single_messages
from frugalstream.summarizer.plan import JobView, Plan
from frugalstream.summarizer.store import NewResult, SummaryStore

Emit = Callable[[list[Out]], Awaitable[None]]
HEADER_TOKENS = 6  # "### 12\n" plus the blank line between items


@dataclass(frozen=True)
class SummarizerConfig:
    pack_tokens: int = 3_000  # input tokens of the items in one packed call
    pack_items: int = 20
    chunk_calls: int = 8  # calls run concurrently and published together
    batch_min_deadline_s: int = 86_400  # a job that may wait this long goes through the batch API
    handler_budget_s: float = 120.0  # well under max_poll_interval (300 s)
    batch_poll_s: float = 30.0


@dataclass
class Summarizer:
    settings: Settings
    provider: Provider
    store: SummaryStore | None = None
    batch: BatchBackend | None = None
    near: NearDuplicates = field(default_factory=NearDuplicates)
    config: SummarizerConfig = field(default_factory=SummarizerConfig)
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    counter: TokenCounter = field(default_factory=TokenCounter)

    def __post_init__(self) -> None:
        if self.store is None:
            self.store = SummaryStore(self.settings.state_dir / "summarizer.sqlite")
        self.db: SummaryStore = self.store

    def model_for(self, job: SummarizeJob) -> str:
        return job.model or self.settings.tiers.small[0]

    def uses_batch(self, job: SummarizeJob) -> bool:
        return self.batch is not None and (job.deadline_s or 0) >= self.config.batch_min_deadline_s

    async def on_jobs(self, jobs: Sequence[SummarizeJob]) -> list[Out]:
        """Runs jobs to the end, collecting every output (tests and tools without a broker)."""
        outs: list[Out] = []

        async def collect(batch: list[Out]) -> None:
            outs.extend(batch)

        for job in jobs:
            while not await self.run_job(job, collect):
                pass
        return outs

    async def run_job(self, job: SummarizeJob, emit: Emit) -> bool:
        """Returns False when the part must continue later (budget spent); everything done so far is published."""
        started = time.monotonic()
        if job.part and self.db.earlier_part_pending(job.tenant, job.job_id, job.part):
            return False  # its repeats may be paid by the earlier part (e.g. a running batch): wait for it
        view = JobView.of(job, self.model_for(job), job.model or self.settings.default_baseline_model)
        raw = self.db.load_plan(view.key)
        plan = Plan.from_json(raw) if raw is not None else await self._plan(view)
        out = Emitter(self.db, view, plan)
        await out.publish([c.call_id for c in self.db.calls(view.key) if not c.published], emit)
        if plan.reuse and not any(c.call_id == "reuse" for c in self.db.calls(view.key)):
            self._record_reuse(view, plan)
            await out.publish(["reuse"], emit)
        resolved = self.db.resolved(view.key)
        pending = [(n, [d for d in p if d not in resolved]) for n, p in enumerate(plan.packs)]
        pending = [(n, ds) for n, ds in pending if ds]
        if pending and self.uses_batch(job):
            if not await self._run_batch(view, plan, pending, out, emit, started):
                return False
            pending = []  # answered, or retried alone inside the batch path
        size = self.config.chunk_calls
        for start in range(0, len(pending), size):
            calls = await asyncio.gather(*(self._run_pack(view, plan, n, ds) for n, ds in pending[start:start + size]))
            await out.publish([c for ids in calls for c in ids], emit)
            if start + size < len(pending) and time.monotonic() - started > self.config.handler_budget_s:
                return False
        self.db.finish(view.key)
        await out.publish([], emit, force=True)
        return True

    async def _plan(self, view: JobView) -> Plan:
        job = view.job
        digests = list(view.groups)
        stored = self.db.lookup(view.scope, digests)
        reuse = {d: (stored[d].item_id, stored[d].job_id) for d in digests if d in stored}
        rest = [d for d in digests if d not in reuse]
        near = await self.near.representatives({d: view.text(d) for d in rest}) if job.near_duplicates else {}
        paid = [d for d in rest if d not in near]
        sizes = self.counter.count_texts([view.text(d) for d in paid], view.model)
        packs = pack([(d, n + HEADER_TOKENS) for d, n in zip(paid, sizes, strict=True)],
                     max_tokens=self.config.pack_tokens, max_items=self.config.pack_items)
        plan = Plan(packs=packs, reuse=reuse, near=near)
        earlier = self.db.job_digests(job.tenant, job.job_id)
        self.db.save_plan(view.key, job.job_id, job.tenant, job.part, job.parts,
                          sum(1 for d in digests if d not in earlier), plan.to_json())
        return plan

    def _covered(self, view: JobView, digest: str, summary: str, members: Sequence[str],
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

    def _record_reuse(self, view: JobView, plan: Plan) -> None:
        stored = self.db.lookup(view.scope, list(plan.reuse))
        covered = [self._covered(view, d, s.summary, ()) for d, s in stored.items()]
        record = usage_record(view.job, view.key, "reuse", model=view.model, baseline_model=view.baseline,
                              covered=covered, actual=None, packed=False, batch=False,
                              simulated=any(s.simulated for s in stored.values()))
        results = [NewResult(d, s.summary, None, s.item_id) for d, s in stored.items()]
        self.db.record_call(job_key=view.key, job_id=view.job.job_id, tenant=view.job.tenant, call_id="reuse",
                            scope=view.scope, model=view.model, simulated=record.simulated, results=results,
                            items=record.items, paid=False, usage=record.model_dump_json(), actual=None)

    def _request(self, view: JobView, digests: Sequence[str]) -> tuple[tuple[ChatMessage, ...], int]:
        job = view.job
        if len(digests) == 1:
            return single_messages(job.instruction, view.text(digests[0])), job.max_output_tokens
        items = [(str(i + 1), view.text(d)) for i, d in enumerate(digests)]
        budget = len(digests) * (job.max_output_tokens + HEADER_TOKENS) + PACK_OUTPUT_SLACK
        return packed_messages(job.instruction, items, job.max_output_tokens), budget

    async def _call(self, view: JobView, digests: Sequence[str]) -> Completion:
        messages, max_tokens = self._request(view, digests)

        async def call(p: Provider, m: str) -> Completion:
            return await p.complete(model=m, messages=messages,
                                    sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens)

        return await call_with_fallbacks(lambda _m: self.provider, (view.model,), call, policy=self.policy,
                                         breakers=self.breakers)

    def accept(self, view: JobView, plan: Plan, call_id: str, digests: Sequence[str],
               result: Completion | ProviderError | FinalProviderError, *, batch: bool) -> list[str]:
        """Persists what `result` answered (synchronously: nothing can interrupt between paying and keeping);
        returns the digests still unanswered, to be retried alone."""
        if not isinstance(result, Completion):
            if len(digests) == 1:
                self._persist(view, plan, call_id, {}, {digests[0]: str(result)[:500]}, None, False, False)
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
        self._persist(view, plan, call_id, good, errors, result, packed, batch)
        return [d for d in digests if d not in good and d not in errors]

    def _persist(self, view: JobView, plan: Plan, call_id: str, good: dict[str, str], errors: dict[str, str],
                 result: Completion | None, packed: bool, batch: bool) -> None:
        members = plan.members()
        results: list[NewResult] = []
        covered: list[Covered] = []
        for d, summary in good.items():
            single = result.usage if result is not None and not packed else None
            covered.append(self._covered(view, d, summary, members.get(d, ()), single))
            results += [NewResult(x, summary, None, view.first_id(d)) for x in (d, *members.get(d, ()))]
        for d, error in errors.items():
            results += [NewResult(x, None, error, view.first_id(d)) for x in (d, *members.get(d, ()))]
        items = sum(len(view.groups[r.digest]) for r in results)
        usage = actual = None
        if result is not None:
            record = usage_record(view.job, view.key, call_id, model=view.model, baseline_model=view.baseline,
                                  covered=covered, actual=result.usage, packed=packed, batch=batch,
                                  simulated=result.simulated)
            usage, actual = record.model_dump_json(), result.usage.model_dump_json()
        self.db.record_call(job_key=view.key, job_id=view.job.job_id, tenant=view.job.tenant, call_id=call_id,
                            scope=view.scope, model=view.model, simulated=bool(result and result.simulated),
                            results=results, items=items, paid=result is not None, usage=usage, actual=actual)

    async def _run_pack(self, view: JobView, plan: Plan, n: int, digests: list[str]) -> list[str]:
        """The packed call (unless a previous delivery already made it), then each unanswered item alone."""
        call_id = f"p{n}"
        done = {c.call_id for c in self.db.calls(view.key)}
        calls: list[str] = []
        retry = digests
        if call_id not in done:
            try:
                result: Completion | FinalProviderError = await self._call(view, digests)
            except FinalProviderError as exc:
                result = exc
            retry = self.accept(view, plan, call_id, digests, result, batch=False)
            calls.append(call_id)
        for d in retry:
            single_id = f"{call_id}.{d}"
            try:
                alone: Completion | FinalProviderError = await self._call(view, [d])
            except FinalProviderError as exc:
                alone = exc
            self.accept(view, plan, single_id, [d], alone, batch=False)
            calls.append(single_id)
        return calls

    async def _run_batch(self, view: JobView, plan: Plan, pending: list[tuple[int, list[str]]], out: Emitter,
                         emit: Emit, started: float) -> bool:
        """Submit once (the batch id is persisted), poll within the handler budget, then accept per pack."""
        assert self.batch is not None
        batch_id = self.db.batch(view.key)
        if batch_id is None:
            requests = []
            for n, ds in pending:
                messages, max_tokens = self._request(view, ds)
                requests.append(BatchRequest(f"p{n}", chat_body(view.model, messages, max_tokens)))
            batch_id = await self.batch.submit(requests, {"job_id": view.job.job_id, "part": str(view.job.part)})
            self.db.save_batch(view.key, batch_id)
        while not (poll := await self.batch.poll(batch_id, view.model)).done:
            if time.monotonic() - started + self.config.batch_poll_s > self.config.handler_budget_s:
                return False
            await asyncio.sleep(self.config.batch_poll_s)
        self.db.drop_batch(view.key)
        calls: list[str] = []
        for n, ds in pending:
            got = poll.results.get(f"p{n}", ProviderError(f"batch {poll.status}: no result", kind="server"))
            retry = self.accept(view, plan, f"p{n}", ds, got, batch=True) if len(ds) > 1 or isinstance(
                got, Completion) else list(ds)
            calls.append(f"p{n}")
            for d in retry:
                try:
                    alone: Completion | FinalProviderError = await self._call(view, [d])
                except FinalProviderError as exc:
                    alone = exc
                self.accept(view, plan, f"p{n}.{d}", [d], alone, batch=False)
                calls.append(f"p{n}.{d}")
        await out.publish([c for c in calls if c in {r.call_id for r in self.db.calls(view.key)}], emit)
        return True
