"""Paid once across a rebalance (`runtime.inflight`, `OwnedPartitions`, the gateway's batch jobs): a partition
that moves while its old owner is still working on it is neither paid for twice nor kept by both owners.

Kafka runs every member's `on_partitions_revoked` to completion before any member's `on_partitions_assigned`;
the tests call the listeners in that order, as aiokafka does. Fakes only: a captured stage handler, a consumer
that records its commits, a publisher whose acknowledged outputs are the broker's log, from which the state
topics are read back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition

from frugalstream.gateway import batch_jobs as batch_jobs_module
from frugalstream.gateway import completed as completed_module
from frugalstream.gateway.app import GatewayService
from frugalstream.gateway.batch_jobs import GatewayLoader, TopicBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.completed import TopicCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.llm.providers.batch_api import BatchCall, BatchPoll, SimulatedBatchJobs
from frugalstream.llm.resilience import RetryPolicy
from frugalstream.runtime import inflight as inflight_module
from frugalstream.runtime.inflight import InFlight
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CompletedCall, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from tests.unit.test_batch_runner import POLICY, T0, Clock
from tests.unit.test_batch_runner import routed as deferrable
from tests.unit.test_gateway_idempotency import CountingProvider, routed
from tests.unit.test_inflight import Consumer, records
from tests.unit.test_stage import CapturingBroker, FakeMessage, FakeRecord


async def settled() -> None:
    """Lets every task that can run, run (nothing here waits on a clock)."""
    for _ in range(20):
        await asyncio.sleep(0)


class LogPublisher(Publisher):
    """Every acknowledged output goes to `log`, the broker as the state topics' readers see it."""

    def __init__(self, settings: Settings, log: list[Out]) -> None:
        super().__init__(None, settings, Metrics())  # type: ignore[arg-type]
        self.log = log

    async def publish_all(self, outs: Sequence[Out], *, service: str = "publisher") -> None:
        self.log.extend(outs)


def read_from(log: list[Out]) -> Any:
    """`read_compacted` over the log: the latest value per key of the given partitions."""

    async def read(_s: Settings, name: str, _m: type, parts: set[int]) -> list[tuple[Any, int]]:
        latest: dict[str | None, tuple[Any, int]] = {}
        for o in log:
            if o.topic == name and o.partition in parts:
                latest[o.key] = (o.value, o.partition)
        return list(latest.values())

    return read


class HeldProvider(CountingProvider):
    """A model call that takes as long as the test says (a long answer): it is paid for once it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def complete(self, **kw: Any):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.release.wait()
        return await super().complete(**kw)


class HeldBatches(SimulatedBatchJobs):
    """A batch API whose upload (`submit`) or `poll` the test holds until it releases it."""

    def __init__(self, *a: Any, hold: str, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.hold = hold
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def _held(self, what: str) -> None:
        if what == self.hold:
            self.entered.set()
            await self.release.wait()

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        await self._held("submit")
        return await super().submit(job_id, model, calls)

    async def poll(self, batch_id: str, model: str, calls: Sequence[BatchCall] = ()) -> BatchPoll:
        await self._held("poll")
        return await super().poll(batch_id, model, calls)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[Out]:
    """The broker: every acknowledged output; the state topics are read back from it."""
    published: list[Out] = []
    monkeypatch.setattr(completed_module, "read_compacted", read_from(published))
    monkeypatch.setattr(batch_jobs_module, "read_compacted", read_from(published))
    return published


def settings() -> Settings:
    return Settings(kafka_idempotent=False, idempotency_retention_s=10**9)


# --- dispatch batches in flight --------------------------------------------------------------------------------


def dispatch_replica(s: Settings, provider: CountingProvider, log: list[Out]) -> tuple[Any, Any, LogPublisher]:
    store = TopicCompleted(s)
    svc = GatewayService(s, Gateway({"simulated": provider}, store, policy=RetryPolicy(attempts=1),
                                    metrics=Metrics()), store=store)
    broker, pub = CapturingBroker(), LogPublisher(s, log)
    svc.register(broker, pub)  # type: ignore[arg-type]
    return broker.handler, broker.options["listener"], pub


def dispatch(s: Settings, request: RoutedRequest, consumer: Consumer) -> FakeMessage:
    record = FakeRecord(s.topic(t.DISPATCH), 0, 0, None, request.model_dump_json().encode())
    return FakeMessage((record,), consumer)  # type: ignore[arg-type]


async def test_a_partition_moved_while_its_call_is_in_flight_is_not_paid_again(log: list[Out]) -> None:
    """The revoke waits for the batch still paying for a call: recorded and committed before the new owner reads
    the paid-call records, so the new owner replays the answer instead of paying for a second, different one."""
    s = settings()
    provider = HeldProvider()
    request = await routed(s, "acme", "r1", "Write a long essay on tides")
    tp = TopicPartition(s.topic(t.DISPATCH), 0)
    handler_a, listener_a, _ = dispatch_replica(s, provider, log)
    consumer_a = Consumer(set())
    consumer_a.assigned = {tp}
    await listener_a.on_partitions_assigned({tp})
    await handler_a(dispatch(s, request, consumer_a))  # runs as a task: the handler returns at once
    await provider.entered.wait()

    revoking = asyncio.create_task(listener_a.on_partitions_revoked({tp}))  # a second replica joins
    await settled()
    assert not revoking.done(), "the revoke returned while a call of the revoked partition was still being paid"
    provider.release.set()
    await revoking
    assert consumer_a.commits == [{tp: 1}], "the batch is committed before the revoke returns"
    consumer_a.assigned = set()
    await listener_a.on_partitions_assigned(set())

    handler_b, listener_b, pub_b = dispatch_replica(s, provider, log)
    await listener_b.on_partitions_assigned({tp})
    consumer_b = Consumer(set())
    consumer_b.assigned = {tp}
    await handler_b(dispatch(s, request, consumer_b))  # as if redelivered (a crash before the commit)
    await pub_b.drain(5.0)

    answers = {o.value.content for o in log if o.topic == t.RESPONSES and isinstance(o.value, LLMResponse)}
    assert sum(provider.calls.values()) == 1, f"paid {sum(provider.calls.values())} times; answers: {answers}"
    assert len(answers) == 1


async def test_a_revoke_waits_for_its_partitions_batches_and_starts_none_of_them_until_the_assignment() -> None:
    """A batch of a revoked partition that was fetched before the revoke and waited for a slot is not started:
    the next owner consumes it again from the committed offset. Other partitions are not waited for."""
    consumer = Consumer({0, 1})
    inflight = InFlight("stage", limit=2)
    gate, slow, ran = asyncio.Event(), asyncio.Event(), []

    async def held() -> None:
        await gate.wait()
        ran.append("held")

    async def other() -> None:
        await slow.wait()  # partition 1 is slow, and not revoked

    async def late() -> None:
        ran.append("late")

    await inflight.submit(records(0, 0, 4), consumer, held)
    await inflight.submit(records(1, 0, 0), consumer, other)
    waiting = asyncio.create_task(inflight.submit(records(0, 5, 9), consumer, late))  # no slot free
    settling = asyncio.create_task(inflight.settle({("t", 0)}))
    await settled()
    assert not settling.done() and not waiting.done()
    gate.set()
    await settling
    await waiting
    await settled()
    assert ran == ["held"], "a batch of the revoked partition started after the revoke"
    assert consumer.commits == [{TopicPartition("t", 0): 5}]

    inflight.reassigned()
    await inflight.submit(records(0, 5, 9), consumer, late)
    slow.set()
    await inflight.drain(timeout_s=5)
    assert ran == ["held", "late"]


async def test_a_batch_a_drain_gives_up_on_is_left_uncommitted() -> None:
    """Cancelled at the drain's bound, the batch did not finish: committing it would lose its records."""
    consumer = Consumer({0})
    inflight = InFlight("stage", limit=2)
    never = asyncio.Event()
    await inflight.submit(records(0, 0, 4), consumer, never.wait)
    await settled()
    await inflight.drain(timeout_s=0.01)
    assert consumer.commits == []


async def test_a_batch_whose_work_raised_runs_again_and_is_committed_only_once_it_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inflight_module, "RETRY_FIRST_S", 0.0)
    consumer = Consumer({0})
    inflight = InFlight("stage", limit=2)
    commits_seen: list[list[dict[TopicPartition, int]]] = []

    async def flaky() -> None:
        commits_seen.append(list(consumer.commits))
        if len(commits_seen) == 1:
            raise ConnectionError("the broker did not acknowledge")

    await inflight.submit(records(0, 0, 4), consumer, flaky)
    await inflight.drain(timeout_s=5)
    assert commits_seen == [[], []], "ran again, and nothing was committed after the failed run"
    assert consumer.commits == [{TopicPartition("t", 0): 5}]


# --- provider batch jobs ------------------------------------------------------------------------------------------


class Replica:
    """A gateway's batch side: paid-call records and batch jobs on the log, and its rebalance listener."""

    def __init__(self, s: Settings, log: list[Out], backend: SimulatedBatchJobs, interactive: CountingProvider,
                 clock: Clock, *, service: bool = False) -> None:
        pub = LogPublisher(s, log)
        self.completed = TopicCompleted(s, pub)
        self.jobs = TopicBatchJobs(s, pub)
        self.emitted: list[Result] = []
        gateway = Gateway({"simulated": interactive}, self.completed, policy=RetryPolicy(attempts=1),
                          metrics=Metrics())
        self.runner = BatchRunner(gateway, self.jobs, {"simulated": backend}, POLICY, emit=self.emit, clock=clock,
                                  metrics=Metrics())
        if service:  # wired as `wire` does: the listener knows the runner
            loader = GatewayService(s, gateway, store=self.completed, runner=self.runner).loader
            assert isinstance(loader, GatewayLoader)
            self.loader = loader
        else:
            self.loader = GatewayLoader(s, self.completed, self.jobs)

    async def emit(self, results: Sequence[Result]) -> None:
        self.emitted.extend(results)


async def batched(replica: Replica, clock: Clock, deadline: float = T0 + 100) -> RoutedRequest:
    request = deferrable(1, deadline=deadline)
    outcome = await replica.runner.intake([(request, 0, replica.runner.accepts(request, T0))])  # type: ignore[list-item]
    assert [r.outcome for r in outcome] == ["batched"]
    return request


async def test_a_revoked_partitions_job_is_not_kept_nor_paid_twice(log: list[Out]) -> None:
    """A tick inside the upload when the partition moves records the job `submitted` afterwards: the record
    reaches the topic, but the old owner keeps nothing of the partition, so only the new owner advances the
    job, and near its deadline one interactive fallback is paid, not two."""
    s, clock = settings(), Clock()
    backend = HeldBatches(SimulatedProvider(latency_scale=0), delay_s=10_000, clock=clock, hold="submit")
    interactive = CountingProvider()
    tp = TopicPartition(s.topic(t.DISPATCH), 0)
    a = Replica(s, log, backend, interactive, clock)
    await a.loader.on_partitions_assigned({tp})
    await batched(a, clock)
    clock.now += 6
    tick = asyncio.create_task(a.runner.tick())  # records `submitting`, then uploads
    await backend.entered.wait()

    await a.loader.on_partitions_revoked({tp})
    await a.loader.on_partitions_assigned(set())
    b = Replica(s, log, backend, interactive, clock)
    await b.loader.on_partitions_assigned({tp})
    backend.release.set()
    await tick
    assert a.jobs.jobs() == [], "the old owner put the job of a partition it lost back"

    clock.now = T0 + 80  # within the fallback margin of the deadline
    await a.runner.tick()
    await b.runner.tick()
    assert sum(interactive.calls.values()) == 1


async def test_a_revoke_waits_for_the_fallback_call_the_runner_is_paying_for(log: list[Out]) -> None:
    """The runner's step in progress is part of what a revoke waits for: the fallback call it was paying for is
    recorded before the new owner loads the paid-call records, and the new owner replays it."""
    s, clock = settings(), Clock()
    backend = SimulatedBatchJobs(SimulatedProvider(latency_scale=0), delay_s=10_000, clock=clock)
    interactive = HeldProvider()
    tp = TopicPartition(s.topic(t.DISPATCH), 0)
    a = Replica(s, log, backend, interactive, clock, service=True)
    await a.loader.on_partitions_assigned({tp})
    await batched(a, clock)
    clock.now += 6
    await a.runner.tick()  # submitted
    clock.now = T0 + 80
    tick = asyncio.create_task(a.runner.tick())  # the deadline is near: an interactive fallback
    await interactive.entered.wait()

    revoking = asyncio.create_task(a.loader.on_partitions_revoked({tp}))
    await settled()
    assert not revoking.done(), "the revoke returned while the runner was paying for a call of the partition"
    interactive.release.set()
    await revoking
    await tick
    await a.loader.on_partitions_assigned(set())
    b = Replica(s, log, backend, interactive, clock)
    await b.loader.on_partitions_assigned({tp})
    await b.runner.tick()
    assert sum(interactive.calls.values()) == 1
    assert [o.request_id for o in (r.response for r in b.emitted) if o is not None] == ["r1"], "replayed"


async def test_a_tick_waiting_on_the_provider_when_the_partition_moved_leaves_the_answers_to_the_new_owner(
    log: list[Out],
) -> None:
    s, clock = settings(), Clock()
    backend = HeldBatches(SimulatedProvider(latency_scale=0), delay_s=10, clock=clock, hold="poll")
    tp = TopicPartition(s.topic(t.DISPATCH), 0)
    a = Replica(s, log, backend, CountingProvider(), clock)
    await a.loader.on_partitions_assigned({tp})
    await batched(a, clock, deadline=T0 + 10_000)
    clock.now += 6
    await a.runner.tick()  # submitted
    clock.now += 20  # the batch has ended
    tick = asyncio.create_task(a.runner.tick())
    await backend.entered.wait()  # polling it

    await a.loader.on_partitions_revoked({tp})
    await a.loader.on_partitions_assigned(set())
    backend.release.set()
    await tick
    assert a.emitted == [], "the old owner answered for a job it no longer holds"
    assert not [o for o in log if o.topic == t.GATEWAY_COMPLETED and isinstance(o.value, CompletedCall)]


async def test_between_the_revoke_and_the_assignment_the_jobs_wait_and_a_kept_partition_goes_on(
    log: list[Out],
) -> None:
    """Until the assignment says whether a revoked partition stays, its jobs are not advanced (another member
    may load them meanwhile) and no request joins one; a partition that stays goes on as before."""
    s, clock = settings(), Clock()
    backend = SimulatedBatchJobs(SimulatedProvider(latency_scale=0), delay_s=10_000, clock=clock)
    tp = TopicPartition(s.topic(t.DISPATCH), 0)
    a = Replica(s, log, backend, CountingProvider(), clock)
    await a.loader.on_partitions_assigned({tp})
    await batched(a, clock)
    clock.now += 6  # gathered long enough: due for submission

    await a.loader.on_partitions_revoked({tp})
    await a.runner.tick()
    late = deferrable(2, deadline=T0 + 100)
    joined = await a.runner.intake([(late, 0, a.runner.accepts(late, clock.now))])  # type: ignore[list-item]
    assert [r.outcome for r in joined] == ["unrecorded"]
    assert [j.state for j in a.jobs.by_partition[0].values()] == ["open"]

    await a.loader.on_partitions_assigned({tp})  # it stays
    await a.runner.tick()
    assert [j.state for j in a.jobs.jobs()] == ["submitted"]


def test_every_stage_running_batches_in_flight_gives_its_listener_their_inflight() -> None:
    """Not only the gateway: a revoke of any stage that runs batches as tasks (the classifier too) waits for the
    revoked partitions' batches, or the next owner redoes them while they still run."""
    from faststream.kafka import KafkaBroker

    from frugalstream.runtime.stage import subscribe
    from frugalstream.runtime.state_topics import OwnedPartitions
    from frugalstream.schemas import LLMRequest

    settings = Settings(concurrent_batches=4)
    broker = KafkaBroker()
    publisher = Publisher(broker, settings)

    async def nothing(_items: Any, _ctx: Any) -> list[Out]:
        return []

    subscribe(broker, publisher, settings, service="classifier", topic=t.REQUESTS, model=LLMRequest,
              process=nothing, concurrency=settings.concurrent_batches)
    (inflight,) = publisher.inflight
    (sub,) = broker.subscribers
    listener = sub._listener  # type: ignore[attr-defined]
    assert isinstance(listener, OwnedPartitions) and listener.inflight is inflight
