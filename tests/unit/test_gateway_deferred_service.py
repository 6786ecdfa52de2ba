"""The gateway service with batch jobs: the handler answers the interactive requests of a batch and only records
the deferrable ones; the runner's answers go where the handler's would (by cache scope, the reply topic, usage by
tenant); a job that cannot be recorded rewinds its request rather than commit it."""

from __future__ import annotations

import time

from frugalstream.gateway.app import GatewayService
from frugalstream.gateway.audits import AuditCalls
from frugalstream.gateway.batch_jobs import MemoryBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.deferred import DeferPolicy
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.llm.providers.batch_api import SimulatedBatchJobs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import BatchJob, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRequest
from tests.unit.test_batch_runner import Clock, routed
from tests.unit.test_gateway_idempotency import FakePublisher, decoded


def service(settings: Settings, clock: Clock) -> tuple[GatewayService, MemoryBatchJobs, FakePublisher]:
    sim = SimulatedProvider(latency_scale=0)
    gateway = Gateway({"simulated": sim}, MemoryCompleted())
    store = MemoryBatchJobs()
    runner = BatchRunner(gateway, store, {"simulated": SimulatedBatchJobs(sim, delay_s=2, clock=clock)},
                         DeferPolicy(gather_s=1, poll_interval_s=1, min_lead_s=60, fallback_margin_s=30), clock=clock)
    svc = GatewayService(settings, gateway, runner=runner)
    publisher = FakePublisher()
    svc.publisher, runner.emit = publisher, svc._emit
    return svc, store, publisher


def later(i: int, **fields: object) -> RoutedRequest:
    r = routed(i, created_at=time.time())
    return r.model_copy(update={"request": r.request.model_copy(update=fields)})


async def test_deferrable_requests_are_recorded_not_answered_and_their_answers_follow_the_usual_routes(
    settings: Settings,
) -> None:
    clock = Clock()
    clock.now = time.time()
    svc, store, publisher = service(settings, clock)
    now_one = later(1, latency_class="interactive")
    batch_one = later(2, reply_topic="acme.answers")
    handled = await svc._on_dispatch([decoded(now_one, 0, 0), decoded(batch_one, 0, 1)], BatchContext(True))
    answered = [o.value.request_id for o in handled.outs if isinstance(o.value, LLMResponse)]
    assert answered == ["r1"] and handled.deferred == [], "the deferrable one is committed, its answer comes later"
    assert [len(j.members) for j in store.jobs()] == [1]
    assert svc.runner is not None
    clock.now += 2
    await svc.runner.tick()
    clock.now += 3
    await svc.runner.tick()
    routes = [(o.topic, o.key) for o in publisher.published]
    scope = batch_one.keys.scope
    assert (t.RESPONSES, scope) in routes and (t.USAGE, "acme") in routes
    assert ("acme.answers", "r2") in routes, "the producer's reply topic gets its copy, keyed by request id"
    [usage] = [o.value for o in publisher.published if o.topic == t.USAGE]
    assert usage.steps[-1].strategy == "batch_api"


async def test_a_job_that_cannot_be_recorded_rewinds_its_request(settings: Settings) -> None:
    clock = Clock()
    clock.now = time.time()
    svc, store, _ = service(settings, clock)

    async def broken(job: BatchJob) -> None:
        raise RuntimeError("no ack")

    store.record = broken  # type: ignore[method-assign]
    record = decoded(later(3), 2, 7)
    handled = await svc._on_dispatch([record], BatchContext(True))
    assert handled.outs == [] and [d.record for d in handled.deferred] == [record.record]


async def test_an_answer_from_a_batch_job_is_sampled_for_audit_like_any_paid_answer(settings: Settings) -> None:
    clock = Clock()
    clock.now = time.time()
    svc, _, publisher = service(settings.model_copy(update={"audit_rate": 1.0}), clock)
    svc.audits = AuditCalls(svc.settings, svc.logic)
    await svc._on_dispatch([decoded(later(4), 0, 0)], BatchContext(True))
    assert svc.runner is not None
    for _ in range(2):
        clock.now += 3
        await svc.runner.tick()
    [audit] = [o.value for o in publisher.published if o.topic == t.AUDITS_DISPATCH]
    assert isinstance(audit, AuditRequest) and audit.kind == "routed_down" and audit.request_id == "r4"
    assert audit.candidate is not None and audit.job is not None and audit.job.route.model == "gpt-4o"
