"""Deferrable requests through provider batch jobs: durable intake, one submission, answers at the batch price,
resume after a restart, deadline and refusal fallbacks, tenant walls. Fakes only: the simulated provider, its
batch backend on a fake clock, in-memory paid-call and job stores."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from frugalstream.gateway.batch_jobs import MemoryBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.deferred import DeferPolicy, answer_by, deferrable
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.identity import request_key
from frugalstream.llm.providers import ProviderError, SimulatedProvider
from frugalstream.llm.providers.batch_api import BatchCall, SimulatedBatchJobs
from frugalstream.schemas import BatchJob, CacheKeys, LLMRequest, Route, RoutedRequest

T0 = 1_700_000_000.0
POLICY = DeferPolicy(gather_s=5, poll_interval_s=1, min_lead_s=60, fallback_margin_s=30)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def routed(i: int, tenant: str = "acme", *, latency: str = "within_1h", deadline: float | None = None,
           created_at: float | None = T0) -> RoutedRequest:
    request = LLMRequest.model_validate({
        "id": f"r{i}", "tenant": tenant, "messages": [{"role": "user", "content": f"{tenant} tag ticket {i}"}],
        "latency_class": latency, "deadline": deadline, "created_at": created_at})
    return RoutedRequest(request=request, routed_at=T0,
                         route=Route(task_type="classification", tier="small", model="gpt-4o-mini",
                                     provider="simulated", reason="test", input_tokens=10, full_input_tokens=10,
                                     baseline_model="gpt-4o"),
                         keys=CacheKeys(scope=f"s-{tenant}", exact=f"e{i}", prefix="p", lookup_text="t", tier_rank=0),
                         embedding="AAAA")


class Harness:
    def __init__(self, *, delay_s: float = 20.0, store: MemoryBatchJobs | None = None,
                 completed: MemoryCompleted | None = None, backend: SimulatedBatchJobs | None = None,
                 clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.sim = SimulatedProvider(latency_scale=0)
        self.completed = completed or MemoryCompleted(clock=self.clock)
        self.store = store or MemoryBatchJobs()
        self.backend = backend or SimulatedBatchJobs(self.sim, delay_s=delay_s, clock=self.clock)
        self.emitted: list[Result] = []
        gateway = Gateway({"simulated": self.sim}, self.completed)
        self.runner = BatchRunner(gateway, self.store, {"simulated": self.backend}, POLICY, emit=self.emit,
                                  clock=self.clock)

    async def emit(self, results: Sequence[Result]) -> None:
        self.emitted.extend(results)

    async def intake(self, batch: Sequence[RoutedRequest], partition: int = 0) -> list[Result]:
        items = [(r, partition, due) for r in batch if (due := self.runner.accepts(r, self.clock.now)) is not None]
        assert len(items) == len(batch), "every test request is deferrable"
        return await self.runner.intake(items)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        await self.runner.tick()


def test_answer_by_and_what_is_deferrable() -> None:
    assert answer_by(routed(1, latency="interactive").request, T0) is None
    assert answer_by(routed(1).request, T0 + 10) == T0 + 3600
    assert answer_by(routed(1, deadline=T0 + 600).request, T0) == T0 + 600, "the tighter of deadline and class"
    assert answer_by(routed(1, created_at=T0 + 10**6).request, T0) == T0 + 3600, "a future created_at is bounded"
    assert answer_by(routed(1, latency="interactive", deadline=T0 + 10**9).request, T0) == T0 + 86400
    providers = frozenset({"simulated"})
    assert deferrable(routed(1), T0, POLICY, providers) == T0 + 3600
    assert deferrable(routed(1, deadline=T0 + 50), T0, POLICY, providers) is None, "due too soon: call now"
    assert deferrable(routed(1, created_at=T0 - 3590), T0, POLICY, providers) is None, "already nearly due"
    assert deferrable(routed(1), T0, POLICY, frozenset({"openai"})) is None, "no batch backend for its provider"


async def test_intake_is_durable_before_it_returns_and_a_redelivery_joins_nothing() -> None:
    h = Harness()
    results = await h.intake([routed(i) for i in range(3)])
    assert [r.outcome for r in results] == ["batched"] * 3 and not any(r.response for r in results)
    assert len(h.store.recorded) == 1 and len(h.store.recorded[0].members) == 3, "one record, every member in it"
    assert all(m.routed.embedding is None for m in h.store.recorded[0].members), "the job record drops embeddings"
    again = await h.intake([routed(i) for i in range(3)])
    assert [r.outcome for r in again] == ["batched"] * 3
    assert len(h.store.recorded) == 1 and len(h.store.jobs()[0].members) == 3, "a redelivery joins no job again"


async def test_one_submission_answers_at_the_batch_price_and_the_job_ends() -> None:
    h = Harness(delay_s=20)
    await h.intake([routed(i) for i in range(3)])
    await h.advance(1)
    assert not h.backend.submitted, "still gathering"
    await h.advance(5)
    assert len(h.backend.submitted) == 1
    job = h.store.jobs()[0]
    assert job.state == "submitted" and job.batch_id == h.backend.submitted[0]
    await h.advance(5)
    assert not h.emitted, "the batch is not done yet"
    await h.advance(20)
    assert sorted(r.routed.request.id for r in h.emitted) == ["r0", "r1", "r2"]
    for r in h.emitted:
        assert r.outcome == "paid" and r.response is not None and r.response.ok and r.usage is not None
        assert r.usage.steps[-1].strategy == "batch_api" and r.usage.steps[-1].batch
    assert len(h.backend.submitted) == 1 and h.store.jobs() == [], "submitted once, then done"
    replay = await h.intake([routed(0)])
    assert replay[0].outcome == "replayed" and replay[0].response in [r.response for r in h.emitted]


async def test_a_restarted_gateway_resumes_the_same_batch_and_never_submits_twice() -> None:
    first = Harness(delay_s=20)
    await first.intake([routed(i) for i in range(2)])
    await first.advance(6)
    batch_id = first.backend.submitted[0]
    # A new process: its memory is empty, the job comes back from the topic, the provider still has the batch.
    second = Harness(store=first.store, completed=first.completed, backend=first.backend, clock=first.clock)
    await second.intake([routed(i) for i in range(2)])  # the uncommitted dispatches come again
    await second.advance(30)
    assert first.backend.submitted == [batch_id], "the same batch id, resumed"
    assert sorted(r.routed.request.id for r in second.emitted) == ["r0", "r1"]
    assert all(r.usage and r.usage.steps[-1].batch for r in second.emitted)


async def test_a_crash_between_creating_a_batch_and_recording_its_id_finds_it_again() -> None:
    first = Harness(delay_s=20)
    await first.intake([routed(i) for i in range(2)])
    real_record, real_submit = first.store.record, first.backend.submit
    creations: list[str] = []

    async def counted_submit(job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        creations.append(job_id)  # every creation request the provider receives (the simulator dedupes them)
        return await real_submit(job_id, model, calls)

    first.backend.submit = counted_submit  # type: ignore[method-assign]

    async def lose_submitted(job: BatchJob) -> None:
        if job.state == "submitted":
            raise RuntimeError("broker gone")
        await real_record(job)

    first.store.record = lose_submitted  # type: ignore[method-assign]
    await first.advance(6)
    assert len(first.backend.submitted) == 1 and first.store.jobs()[0].state == "submitting"
    first.store.record = real_record  # type: ignore[method-assign]
    second = Harness(store=first.store, completed=first.completed, backend=first.backend, clock=first.clock)
    await second.advance(1)
    assert len(creations) == 1, "found by its job id, not created again"
    assert second.store.jobs()[0].batch_id == first.backend.submitted[0]


async def test_a_deadline_the_batch_cannot_meet_falls_back_to_an_interactive_call_in_time() -> None:
    h = Harness(delay_s=10_000)
    due = T0 + 100
    await h.intake([routed(1, deadline=due), routed(2)])
    await h.advance(6)
    assert len(h.backend.submitted) == 1
    while not h.emitted:
        await h.advance(5)
    assert h.clock.now <= due - POLICY.fallback_margin_s + 5, "answered before it was due"
    [answer] = h.emitted
    assert answer.routed.request.id == "r1" and answer.outcome == "paid"
    assert answer.usage is not None and not any(s.batch for s in answer.usage.steps), "at the interactive price"
    await h.advance(3600)  # r2 is due too: the batch never ended, so it falls back as well, and the batch is cancelled
    assert sorted(r.routed.request.id for r in h.emitted) == ["r1", "r2"]
    await h.advance(1)
    assert h.store.jobs() == [], "the cancelled batch ended and its job is done"


async def test_a_refused_batch_answers_its_members_at_once() -> None:
    h = Harness()

    async def refuse(job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        raise ProviderError("batches not enabled", kind="client", status=400)

    h.backend.submit = refuse  # type: ignore[method-assign]
    await h.intake([routed(1)])
    await h.advance(6)
    assert [r.routed.request.id for r in h.emitted] == ["r1"] and h.emitted[0].response is not None
    assert h.emitted[0].response.ok and h.store.jobs() == []


async def test_a_job_that_cannot_be_recorded_leaves_its_requests_to_be_delivered_again() -> None:
    h = Harness()

    async def broken(job: BatchJob) -> None:
        raise RuntimeError("not acknowledged")

    h.store.record = broken  # type: ignore[method-assign]
    results = await h.intake([routed(1)])
    assert results[0].outcome == "unrecorded" and results[0].retry_after_s is not None


async def test_tenants_reusing_an_id_are_two_members_each_answered_for_itself() -> None:
    h = Harness(delay_s=1)
    await h.intake([routed(7, "acme"), routed(7, "globex")])
    assert len(h.store.jobs()[0].members) == 2
    await h.advance(6)
    await h.advance(2)
    by_tenant = {r.routed.request.tenant: r for r in h.emitted}
    assert set(by_tenant) == {"acme", "globex"}
    for tenant, r in by_tenant.items():
        assert r.response is not None and r.response.tenant == tenant
        assert h.completed.get(0, request_key(tenant, "r7")) is not None


@pytest.mark.parametrize("count", [3])
async def test_a_full_job_is_submitted_without_waiting(count: int) -> None:
    h = Harness()
    h.runner.policy = DeferPolicy(gather_s=1000, max_requests=count, poll_interval_s=1, min_lead_s=60,
                                  fallback_margin_s=30)
    await h.intake([routed(i) for i in range(count + 1)])
    assert sorted(len(j.members) for j in h.store.jobs()) == [1, count], "a full job takes no more members"
    await h.advance(1)
    assert len(h.backend.submitted) == 1


class LoadingStore(MemoryBatchJobs):
    """A store whose jobs of a newly gained partition appear only once its load is awaited, as on the topic."""

    def __init__(self, hidden: list[BatchJob]) -> None:
        super().__init__()
        self.hidden = hidden

    async def ready(self, partition: int) -> None:
        for job in [j for j in self.hidden if j.partition == partition]:
            self.hidden.remove(job)
            self.put(job)


async def test_a_redelivery_on_a_partition_still_loading_waits_for_its_jobs_and_joins_none() -> None:
    first = Harness()
    await first.intake([routed(i) for i in range(2)], partition=3)
    store = LoadingStore(list(first.store.jobs()))
    second = Harness(store=store, completed=first.completed, clock=first.clock)
    results = await second.intake([routed(i) for i in range(2)], partition=3)
    assert [r.outcome for r in results] == ["batched", "batched"]
    assert store.recorded == [] and len(store.jobs()) == 1, "the loaded job already holds them"


async def test_a_line_the_batch_ran_after_the_fallback_is_billed_once_and_not_answered_again() -> None:
    h = Harness(delay_s=80)

    async def ignore_cancel(batch_id: str) -> None:  # a provider that had already run the line
        return None

    h.backend.cancel = ignore_cancel  # type: ignore[method-assign]
    due = T0 + 100
    await h.intake([routed(1, deadline=due)])
    await h.advance(6)
    while not h.emitted:
        await h.advance(5)
    assert len(h.emitted) == 1 and h.emitted[0].response is not None
    await h.advance(60)  # the batch ends: its line for r1 was paid as well
    late = [r for r in h.emitted[1:]]
    assert len(late) == 1 and late[0].response is None and late[0].usage is not None, "only the spend, no 2nd answer"
    usage = late[0].usage
    assert usage.id.endswith(":batch-late") and usage.baseline.batch and not usage.steps, "zero saving, never dropped"
    assert h.store.jobs() == []


def test_a_request_too_large_for_a_job_record_is_called_at_once() -> None:
    h = Harness()
    big = routed(1).request.model_copy(update={"messages": (
        routed(1).request.messages[0].model_copy(update={"content": "x" * 500_000}),)})
    assert h.runner.accepts(routed(1), T0) is not None
    assert h.runner.accepts(routed(1).model_copy(update={"request": big}), T0) is None
