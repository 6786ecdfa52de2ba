"""Deferrable requests through provider batch APIs: gather, submit, poll, answer, and fall back in time.

Intake (in the dispatch handler). A deferrable request already paid is replayed; one already in a job is left
there; any other joins the open job of its (partition, provider, model), and the job is recorded on
`llm.gateway.batches` before the handler returns, so the dispatch offset is committed only once the request is
durable in a job. A record that fails defers the request (redelivered shortly), as an unrecorded paid call does.

Background (`tick`, every `tick_s`). An open job is submitted when it has gathered long enough, is full, or a
member is nearly due: first recorded as `submitting`, then created at the provider with our job id as its
metadata, then recorded as `submitted` with the provider's batch id. A gateway that dies in between finds the
batch again by the job id (`BatchJobs.find`) rather than creating a second one; only a provider that keeps no
metadata (Anthropic) can be asked twice, and only if the process died in the milliseconds between the
provider's answer and the broker's acknowledgement (logged as `batch_resubmitted_unverified`).
A submitted job is polled; each answer is recorded on `llm.gateway.completed` (paid once, as an interactive
call is) and only then published. A member still unanswered `fallback_margin_s` before it is due, a failed
line, an expired or refused batch: the member is answered interactively through the gateway's own call path
(retries, fallbacks, its own paid-once record). A batch line that still arrives for a member answered that way
was paid too: its usage is published (priced, never dropped), once, under its own id.

Nothing here publishes by itself: `emit` (the service) routes each `Result` to its topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from frugalstream.gateway.batch_jobs import BatchJobStore
from frugalstream.gateway.deferred import DeferPolicy, deferrable
from frugalstream.gateway.logic import RECORD_RETRY_S, Gateway, Result, llm_response, replayed
from frugalstream.llm.identity import request_key
from frugalstream.llm.prompt_cache import canonical_tools
from frugalstream.llm.providers.base import Completion, ProviderError
from frugalstream.llm.providers.batch_api import BatchCall, BatchJobs, BatchPoll, custom_id
from frugalstream.llm.usage import discarded_usage, llm_usage
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.service import cancel_tasks
from frugalstream.schemas import (
    BatchJob,
    BatchMember,
    CompletedCall,
    RoutedRequest,
    TokenUsage,
    UsageRecord,
    wire_bytes,
)

log = get_logger(__name__)
Emit = Callable[[Sequence[Result]], Awaitable[None]]


def member_key(member: BatchMember) -> str:
    return request_key(member.routed.request.tenant, member.routed.request.id)


def batch_priced(usage: UsageRecord | None) -> bool:
    if usage is None:
        return False
    return (usage.steps[-1] if usage.steps else usage.baseline).batch


@dataclass
class BatchRunner:
    gateway: Gateway
    store: BatchJobStore
    backends: Mapping[str, BatchJobs]  # by the routed provider name
    policy: DeferPolicy = field(default_factory=DeferPolicy)
    emit: Emit | None = None
    metrics: Metrics = METRICS
    clock: Callable[[], float] = time.time
    tick_s: float = 1.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _advancing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # held while a tick advances a job
    _settled: dict[str, set[str]] = field(default_factory=dict, repr=False)  # job id -> answered member keys
    _next_poll: dict[str, float] = field(default_factory=dict, repr=False)
    _tried: set[str] = field(default_factory=set, repr=False)  # jobs this process itself tried to submit
    _cancelled: set[str] = field(default_factory=set, repr=False)
    _ticker: asyncio.Task[None] | None = field(default=None, repr=False)

    def accepts(self, routed: RoutedRequest, now: float) -> float | None:
        """The due time if `routed` goes into a batch job, else None (also for a request too large to share a
        job record with others: it could never be recorded, so it is called at once)."""
        due = deferrable(routed, now, self.policy, frozenset(self.backends))
        if due is not None and wire_bytes(routed) > self.policy.max_job_bytes // 2:
            return None
        return due

    # --- intake -------------------------------------------------------------------------------------------

    async def intake(self, items: Sequence[tuple[RoutedRequest, int, float]]) -> list[Result]:
        """One result per distinct request of `items` ((routed, dispatch partition, due time)): replayed,
        batched (durable in a job), or unrecorded (to be delivered again)."""
        async with self._lock:
            results: dict[str, Result] = {}
            joined: dict[str, list[str]] = {}  # job id -> keys that joined it now
            touched: dict[str, tuple[BatchJob, int]] = {}  # job id -> (new version, its size in bytes)
            unready = await self._ready({partition for _, partition, _ in items})
            # Read only once every partition's jobs are loaded: a job not yet read back is a job joined twice.
            members = {member_key(m): j.job_id for j in self.store.jobs() for m in j.members}
            for routed, partition, due in items:
                key = request_key(routed.request.tenant, routed.request.id)
                if key in results:
                    continue
                try:
                    if partition in unready:
                        raise RuntimeError(f"the batch jobs of partition {partition} are not loaded")
                    done = await self.gateway.completed.lookup(partition, key)
                except Exception:
                    log.warning("batch_intake_unready", request_id=routed.request.id, partition=partition,
                                exc_info=True)
                    results[key] = Result(key, routed, "unrecorded", retry_after_s=RECORD_RETRY_S)
                    continue
                if done is not None:
                    results[key] = replayed(key, routed, done)
                elif key in members:
                    results[key] = Result(key, routed, "batched")
                else:
                    job_id = self._join(touched, routed, partition, due)
                    members[key] = job_id
                    joined.setdefault(job_id, []).append(key)
                    results[key] = Result(key, routed, "batched")
            for job_id, (job, _size) in touched.items():
                try:
                    await self.store.record(job)
                except Exception:
                    log.warning("batch_job_record_failed", job_id=job_id, members=len(joined[job_id]), exc_info=True)
                    for key in joined[job_id]:
                        results[key] = Result(key, results[key].routed, "unrecorded", retry_after_s=RECORD_RETRY_S)
                else:
                    self.metrics.record_batch("joined", len(joined[job_id]))
            return list(results.values())

    async def _ready(self, partitions: set[int]) -> set[int]:
        """Waits for the jobs of these partitions to be loaded; returns those whose load failed."""
        failed = set()
        for partition in partitions:
            try:
                await self.store.ready(partition)
            except Exception:
                failed.add(partition)
        return failed

    def _join(self, touched: dict[str, tuple[BatchJob, int]], routed: RoutedRequest, partition: int,
              due: float) -> str:
        """Adds the request to the open job of its (partition, provider, model), or to a new one when none has
        room; returns the job id. The stored copy drops the embedding (only dedupe reads it)."""
        member = BatchMember(routed=routed.model_copy(update={"embedding": None}), answer_by=due)
        size = wire_bytes(member) + 2
        route, now = routed.route, self.clock()
        open_jobs = {j.job_id: (j, wire_bytes(j)) for j in self.store.jobs() if j.state == "open"}
        for job, job_size in {**open_jobs, **touched}.values():
            if (job.partition, job.provider, job.model) != (partition, route.provider, route.model):
                continue
            if len(job.members) < self.policy.max_requests and job_size + size <= self.policy.max_job_bytes:
                touched[job.job_id] = (job.model_copy(update={"members": (*job.members, member), "updated_at": now}),
                                       job_size + size)
                return job.job_id
        job = BatchJob(job_id=f"fsb-{partition}-{uuid.uuid4().hex}", partition=partition, provider=route.provider,
                       model=route.model, state="open", members=(member,), created_at=now, updated_at=now)
        touched[job.job_id] = (job, wire_bytes(job))
        return job.job_id

    # --- background ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_forever(), name="gateway-batch-runner")

    async def stop(self) -> None:
        await cancel_tasks(self._ticker)
        self._ticker = None

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self.tick()

    async def tick(self) -> None:
        """Advances every job of the owned partitions; one job's failure never stops the others. What this
        process remembers of jobs it no longer holds (done, or their partition revoked) is dropped."""
        jobs = self.store.jobs()
        live = {j.job_id for j in jobs}
        for memo in (self._settled, self._next_poll):
            for job_id in [k for k in memo if k not in live]:
                del memo[job_id]
        self._tried &= live
        self._cancelled &= live
        for job in jobs:
            try:
                async with self._advancing:
                    await self._advance(job)
            except Exception:
                log.exception("batch_job_tick_failed", job_id=job.job_id, state=job.state)

    async def quiesce(self) -> None:
        """Returns once no intake runs and no job is being advanced. On a revoke, called once the store hides
        the revoked partitions' jobs: what the runner starts next leaves them alone, and what it was doing
        (a submit, a fallback call) is recorded before their next owner reads them."""
        async with self._lock:
            pass
        async with self._advancing:
            pass

    def _current(self, job_id: str) -> BatchJob | None:
        """The job as the store holds it; None once it is done or its partition was revoked (owned elsewhere):
        checked again after every wait, so a job that moved is advanced by its new owner only."""
        return next((j for j in self.store.jobs() if j.job_id == job_id), None)

    def _held(self, job_id: str) -> bool:
        return self._current(job_id) is not None

    async def _advance(self, job: BatchJob) -> None:
        now = self.clock()
        if not self._held(job.job_id):
            return
        if job.state == "open":
            due = min(m.answer_by for m in job.members)
            if (now - job.created_at < self.policy.gather_s and len(job.members) < self.policy.max_requests
                    and due - now > self.policy.fallback_margin_s + self.policy.poll_interval_s):
                return
            async with self._lock:  # intake adds members only to open jobs: close it under the same lock
                current = self._current(job.job_id)
                if current is None or current.state != "open":
                    return
                job = current.model_copy(update={"state": "submitting", "updated_at": now})
                await self.store.record(job)
        if job.state == "submitting" and now >= self._next_poll.get(job.job_id, 0.0) and self._held(job.job_id):
            job = await self._submit(job)
        if job.state == "submitted" and now >= self._next_poll.get(job.job_id, 0.0) and self._held(job.job_id):
            await self._poll(job)
        current = self._current(job.job_id)
        if current is not None and current.state in ("submitting", "submitted"):
            await self._fallback_due(current)
            if self._held(job.job_id):
                await self._finish_if_settled(current)

    def _calls(self, job: BatchJob, *, plan: bool = True) -> list[BatchCall]:
        """The job's requests; with `plan`, their cache breakpoints (planning notes each prefix as sent: only
        the submission plans, the poll reads the requests back to estimate a line that reports no usage)."""
        calls = []
        for m in job.members:
            request = m.routed.request
            cache_plan = self.gateway.cache_options(self.backends[job.provider], job.model, request).get(
                "cache_plan") if plan else None
            calls.append(BatchCall(
                custom_id=custom_id(member_key(m)), model=job.model, messages=request.messages,
                sampling=request.sampling, max_tokens=request.max_tokens, tools=canonical_tools(request.tools),
                response_format=request.response_format, tool_choice=request.tool_choice,
                parallel_tool_calls=request.parallel_tool_calls, cache_plan=cache_plan))
        return calls

    async def _submit(self, job: BatchJob) -> BatchJob:
        backend = self.backends.get(job.provider)
        if backend is None:
            log.warning("batch_backend_missing", job_id=job.job_id, provider=job.provider)
            await self._fallback(job, job.members, "no batch backend")
            return job
        try:
            batch_id = await backend.find(job.job_id)
            if batch_id is not None:
                log.info("batch_found_again", job_id=job.job_id, batch_id=batch_id)
            else:
                if job.job_id not in self._tried and not getattr(backend, "can_find", True):
                    log.warning("batch_resubmitted_unverified", job_id=job.job_id)
                self._tried.add(job.job_id)
                batch_id = await backend.submit(job.job_id, job.model, self._calls(job))
        except ProviderError as exc:
            log.warning("batch_submit_failed", job_id=job.job_id, kind=exc.kind, retryable=exc.retryable)
            self._next_poll[job.job_id] = self.clock() + self.policy.poll_interval_s  # retried then, not at once
            if not exc.retryable:  # refused: answer every member now rather than wait for its deadline
                await self._fallback(job, job.members, "batch refused")
            return job
        submitted = job.model_copy(update={"state": "submitted", "batch_id": batch_id, "submitted_at": self.clock(),
                                           "updated_at": self.clock()})
        await self.store.record(submitted)  # durable before anyone waits on it
        self.metrics.record_batch("submitted")
        log.info("batch_submitted", job_id=job.job_id, batch_id=batch_id, members=len(job.members),
                 provider=job.provider, model=job.model)
        self._next_poll[job.job_id] = self.clock() + self.policy.poll_interval_s
        return submitted

    async def _poll(self, job: BatchJob) -> None:
        assert job.batch_id is not None
        backend = self.backends.get(job.provider)
        if backend is None:
            await self._fallback(job, job.members, "no batch backend")
            return
        try:
            polled = await backend.poll(job.batch_id, job.model, self._calls(job, plan=False))
        except ProviderError as exc:
            if exc.retryable:
                self._next_poll[job.job_id] = self.clock() + self.policy.poll_interval_s
                return
            log.warning("batch_poll_failed", job_id=job.job_id, batch_id=job.batch_id, kind=exc.kind)
            polled = BatchPoll(True, {}, "unreadable")
        except Exception:  # polled again later; meanwhile the deadline fallback still answers its members
            log.exception("batch_poll_broken", job_id=job.job_id, batch_id=job.batch_id)
            self._next_poll[job.job_id] = self.clock() + self.policy.poll_interval_s
            return
        if not polled.done:
            self._next_poll[job.job_id] = self.clock() + self.policy.poll_interval_s
            return
        log.info("batch_ended", job_id=job.job_id, batch_id=job.batch_id, status=polled.status,
                 answered=sum(isinstance(v, Completion) for v in polled.results.values()), members=len(job.members))
        missing: list[BatchMember] = []
        settled = self._settled.setdefault(job.job_id, set())
        for member in job.members:
            if not self._held(job.job_id):
                return
            outcome = polled.results.get(custom_id(member_key(member)))
            if isinstance(outcome, Completion):
                await self._settle(job, member, outcome, answered=member_key(member) in settled)
                continue
            if isinstance(outcome, ProviderError) and outcome.usage is not None:
                await self._bill_unusable(job, member, outcome.usage)
            if member_key(member) not in settled:
                missing.append(member)
        if missing and self._held(job.job_id):
            await self._fallback(job, missing, f"batch {polled.status}: lines failed or missing")
        if self._held(job.job_id):
            await self._finish_if_settled(job, ended=True)

    async def _settle(self, job: BatchJob, member: BatchMember, completion: Completion, *, answered: bool) -> None:
        """A batch answer: recorded as paid, then published. A member already recorded (by an earlier try whose
        publish may have failed, or by an interactive fallback) has its recorded answer published again, once
        per process, and a batch line that ran for a member answered interactively is billed, at zero saving."""
        routed, key, partition = member.routed, member_key(member), job.partition
        done = await self.gateway.completed.lookup(partition, key)
        usage = llm_usage(routed, completion.model, completion.usage, batch=True, simulated=completion.simulated)
        if done is not None:
            results = [] if answered else [replayed(key, routed, done)]
            if not batch_priced(done.usage):  # answered interactively, and the batch ran it too: both were paid
                late = usage.model_copy(update={"id": f"{usage.id}:batch-late", "steps": (),
                                                "baseline": usage.steps[-1] if usage.steps else usage.baseline})
                self.metrics.record_batch("late_line")
                results.append(Result(key, routed, "paid", None, late))
            await self._emit(results)
            self._settled.setdefault(job.job_id, set()).add(key)
            return
        response = self.gateway.fitted(llm_response(routed, completion), routed)
        log.info("provider_call", request_id=routed.request.id, tenant=routed.request.tenant, model=completion.model,
                 batch_id=job.batch_id, input_tokens=completion.usage.input_tokens,
                 output_tokens=completion.usage.output_tokens)
        await self.gateway.completed.record(partition, CompletedCall(
            tenant=routed.request.tenant, request_id=routed.request.id, response=response, usage=usage,
            completed_at=time.time()))
        await self._emit([Result(key, routed, "paid", response, usage)])
        self.metrics.record_batch("answered")
        self._settled.setdefault(job.job_id, set()).add(key)

    async def _bill_unusable(self, job: BatchJob, member: BatchMember, usage: TokenUsage) -> None:
        """A batch line billed for an answer that cannot be used: its spend is published (at the batch price,
        under an id of its own, so a batch polled again after a failed publish is counted once) before the
        member is answered another way."""
        backend = self.backends.get(job.provider)
        record = discarded_usage(member.routed, job.model, usage, 0, batch=True,
                                 simulated=bool(getattr(backend, "simulated", False)))
        await self._emit([Result(member_key(member), member.routed, "paid", None, record)])

    async def _fallback_due(self, job: BatchJob) -> None:
        now = self.clock()
        settled = self._settled.get(job.job_id, set())
        due = [m for m in job.members if member_key(m) not in settled
               and m.answer_by - now <= self.policy.fallback_margin_s]
        if due:
            await self._fallback(job, due, "deadline")

    async def _fallback(self, job: BatchJob, members: Sequence[BatchMember], why: str) -> None:
        """Interactive calls through the gateway's own path (its paid-once record replays what was paid)."""
        settled = self._settled.setdefault(job.job_id, set())
        todo = [m for m in members if member_key(m) not in settled]
        if not todo:
            return
        log.info("batch_fallback_interactive", job_id=job.job_id, batch_id=job.batch_id, members=len(todo), why=why)
        results = await self.gateway.handle([m.routed for m in todo], [job.partition] * len(todo), can_defer=False)
        await self._emit(results)
        self.metrics.record_batch("fallback", len(results))
        settled.update(r.key for r in results)

    async def _finish_if_settled(self, job: BatchJob, *, ended: bool = False) -> None:
        """Done once every member is answered and the batch (if one was created) has ended. A batch whose members
        were all answered another way is cancelled, and still polled to its end: lines it ran before the cancel
        were paid, and are billed as late lines."""
        settled = self._settled.get(job.job_id, set())
        if any(member_key(m) not in settled for m in job.members):
            return
        if job.state == "submitted" and job.batch_id and not ended:
            if job.job_id not in self._cancelled:
                self._cancelled.add(job.job_id)
                backend = self.backends.get(job.provider)
                log.info("batch_cancelled", job_id=job.job_id, batch_id=job.batch_id)
                with contextlib.suppress(ProviderError):
                    if backend is not None:
                        await backend.cancel(job.batch_id)
            return
        await self.store.record(job.model_copy(update={"state": "done", "members": (), "updated_at": self.clock()}))
        for memo in (self._settled, self._next_poll):
            memo.pop(job.job_id, None)
        self._cancelled.discard(job.job_id)
        self.metrics.record_batch("done")

    async def _emit(self, results: Sequence[Result]) -> None:
        if self.emit is None:
            raise RuntimeError("the batch runner has no emitter (service not registered)")
        await self.emit(results)
