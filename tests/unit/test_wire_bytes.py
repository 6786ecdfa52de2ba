"""Records are sized as the publisher sizes them, in UTF-8 bytes. A batch job joined by characters could pass for
800 kB while being 1.9 MB on the wire, and the record its members were promised would never reach
`llm.gateway.batches` (after a restart they would be lost); an answer measured in characters could pass the
gateway's limit and then be refused by the publisher, paid-once record included."""

from __future__ import annotations

from collections.abc import Sequence

from frugalstream.gateway.batch_jobs import MemoryBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.deferred import DeferPolicy
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.llm.providers.batch_api import SimulatedBatchJobs
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, RoutedRequest
from tests.unit.test_batch_runner import Clock, routed

SETTINGS = Settings()
POLICY = DeferPolicy(gather_s=5, poll_interval_s=1, min_lead_s=60, fallback_margin_s=30,
                     max_job_bytes=int(SETTINGS.max_message_bytes * 0.8))  # as batch_wiring builds it


def wide(i: int, tenant: str, chars: int) -> RoutedRequest:
    """A prompt of CJK characters (three UTF-8 bytes each), keyed as the classifier keys it."""
    base = routed(i, tenant)
    request = LLMRequest.model_validate({**base.request.model_dump(), "messages": [
        {"role": "user", "content": "\u6c49" * chars}]})
    return base.model_copy(update={"request": request, "keys": cache_keys(request, "small")})


def runner(store: MemoryBatchJobs, clock: Clock) -> BatchRunner:
    sim = SimulatedProvider(latency_scale=0)

    async def emit(results: Sequence[Result]) -> None:
        return None

    return BatchRunner(Gateway({"simulated": sim}, MemoryCompleted(clock=clock)), store,
                       {"simulated": SimulatedBatchJobs(sim, delay_s=20, clock=clock)}, POLICY, emit=emit, clock=clock)


async def test_every_job_record_fits_one_message_whatever_its_members_text() -> None:
    clock, store = Clock(), MemoryBatchJobs()
    batch = runner(store, clock)
    requests = [routed(1, "victim"), *(wide(i, "evil", 60_000) for i in (2, 3, 4, 5))]  # ~360 kB each on the wire
    items = [(r, 0, due) for r in requests if (due := batch.accepts(r, clock.now)) is not None]
    assert len(items) == len(requests), "each fits half a job: all may wait"
    results = await batch.intake(items)
    assert {r.outcome for r in results} == {"batched"}
    sizes = [len(job.model_dump_json().encode()) for job in store.recorded]
    assert max(sizes) <= POLICY.max_job_bytes < SETTINGS.max_message_bytes, sizes
    assert len({job.job_id for job in store.recorded}) >= 2, "the members were spread over jobs that fit"


def test_a_request_over_half_a_job_in_bytes_is_not_held_for_one() -> None:
    clock = Clock()
    assert runner(MemoryBatchJobs(), clock).accepts(wide(1, "evil", 150_000), clock.now) is None  # 450 kB, 150k chars


async def test_an_answer_over_the_limit_in_bytes_but_not_in_characters_is_too_large() -> None:
    from tests.unit.test_gateway_idempotency import CountingProvider, answer
    from tests.unit.test_gateway_idempotency import routed as dispatched

    r = await dispatched(SETTINGS, "acme", "cjk-1", "\u6c49" * 300)
    free = answer((await Gateway({"simulated": CountingProvider()}, MemoryCompleted()).handle([r]))[0])
    chars, data = len(free.model_dump_json()), len(free.model_dump_json().encode())
    assert free.ok and data > chars + 500
    capped = Gateway({"simulated": CountingProvider()}, MemoryCompleted(), max_answer_bytes=(chars + data) // 2)
    got = answer((await capped.handle([r]))[0])
    assert got.error is not None and got.error.code == "too_large"
