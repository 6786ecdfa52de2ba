"""`bench pipeline`'s time inside the services: a request's stage spans on the answer path, less its model call."""

from __future__ import annotations

import asyncio

from opentelemetry import trace

from frugalstream.runtime import tracing
from frugalstream.tools.bench.inside import inside_ms, span_recorder

MS = 1_000_000  # span times are in nanoseconds


def stage(tracer: trace.Tracer, topic: str, rid: str, start_ms: int, end_ms: int) -> trace.Span:
    span = tracer.start_span(f"process {topic}", start_time=start_ms * MS, attributes={
        "messaging.destination.name": topic, "frugalstream.request_id": rid, "frugalstream.tenant": "acme"})
    span.end(end_time=end_ms * MS)
    return span


def traced_miss(tracer: trace.Tracer, rid: str, stages: tuple[tuple[int, int], ...], call: tuple[int, int]) -> None:
    """A request's spans on the answer path (classifier, dedupe, gateway; ms) and its model call in the gateway's."""
    topics = ("p.llm.requests", "p.llm.requests.routed", "p.llm.requests.dispatch")
    spans = [stage(tracer, topic, rid, start, end) for topic, (start, end) in zip(topics, stages, strict=True)]
    model_call = tracer.start_span("chat gpt-4o-mini", context=trace.set_span_in_context(spans[-1]),
                                   start_time=call[0] * MS)
    model_call.end(end_time=call[1] * MS)


def test_inside_time_sums_the_answer_path_and_leaves_out_the_model_call_and_other_topics() -> None:
    with span_recorder() as spans:
        tracer = tracing.tracer()
        assert tracer is not None
        traced_miss(tracer, "r1", ((0, 10), (60, 65), (100, 420)), call=(105, 400))
        stage(tracer, "p.llm.responses", "r1", 500, 900)  # filling the cache: not on the answer path
        stage(tracer, "p.llm.requests", "r2", 0, 7)
        found = inside_ms(spans, {f"p.{n}": n for n in ("llm.requests", "llm.requests.routed",
                                                         "llm.requests.dispatch", "llm.responses")})
    assert found == {"r1": 10 + 5 + (320 - 295), "r2": 7}
    assert tracing.tracer() is None  # the recorder leaves tracing as it found it: off


def test_a_ramp_step_is_sustained_only_when_answered_drained_flat_and_really_offered() -> None:
    from frugalstream.tools.bench.pipeline import sustained

    step = {"rate_rps": 150.0, "offered_rps": 149.6, "requests": 2250, "answered": 2250, "errors": 0,
            "drain_s": 3.0, "lag_samples": [(t, 0, 40) for t in range(15)]}
    assert sustained(step)
    assert not sustained({**step, "offered_rps": 120.0})  # the generator fell behind: 150 was never tested
    assert not sustained({**step, "answered": 2249})
    assert not sustained({**step, "drain_s": 6.0})
    growing = [(t, 0, 40 + 100 * t) for t in range(15)]
    assert not sustained({**step, "lag_samples": growing})


def test_requests_that_can_wait_are_reported_apart_from_the_interactive_miss_overhead() -> None:
    """A job that can wait is held for a provider batch on purpose: its seconds are not overhead on a miss."""
    from types import SimpleNamespace

    from frugalstream.schemas import LLMResponse
    from frugalstream.tools.bench.pipeline import report

    def answer(rid: str, source: str, e2e_ms: float, provider_ms: float | None = 30.0) -> LLMResponse:
        return LLMResponse(request_id=rid, tenant="acme", source=source,  # type: ignore[arg-type]
                           created_at=100.0, responded_at=100.0 + e2e_ms / 1000, provider_latency_ms=provider_ms)

    measured = [answer(f"m{i}", "llm", 30.0 + 50.0 + i) for i in range(10)]  # overheads 50..59 ms
    measured += [answer("h1", "cache_exact", 20.0, None), answer("w1", "llm", 4_030.0), answer("w2", "llm", 3_030.0)]
    run = SimpleNamespace(lag=[(0.0, 1, 2)])
    rep = report(50.0, 1.0, 1.0, 0.5, run, measured, requests=13, can_wait={"w1", "w2"})  # type: ignore[arg-type]
    assert (rep["misses"], rep["hits"], rep["deferred"], rep["answered"]) == (10, 1, 2, 13)
    assert rep["miss_overhead_ms_p99"] == 59.0 and rep["miss_overhead_ms_p50"] == 55.0
    assert rep["deferred_e2e_ms_p99"] == 4_030.0 and rep["deferred_e2e_ms_p50"] == 4_030.0
    assert set(rep["miss_overheads"]) == {f"m{i}" for i in range(10)}
    everything = report(50.0, 1.0, 1.0, 0.5, run, measured, requests=13)  # type: ignore[arg-type]
    assert everything["miss_overhead_ms_p99"] == 4_000.0 and everything["deferred"] == 0


def test_latency_runs_to_the_answer_reaching_the_reader_not_to_the_gateway_stamping_it() -> None:
    from types import SimpleNamespace

    from frugalstream.schemas import LLMResponse
    from frugalstream.tools.bench.pipeline import report

    answer = LLMResponse(request_id="m", tenant="acme", source="llm", created_at=100.0, responded_at=100.05,
                         provider_latency_ms=30.0)
    run = SimpleNamespace(lag=[], received={"m": 100.09})  # published and fetched 40 ms after the stamp
    rep = report(1.0, 1.0, 1.0, 0.1, run, [answer], requests=1)  # type: ignore[arg-type]
    assert rep["miss_e2e_ms_p50"] == 90.0 and rep["miss_overhead_ms_p50"] == 60.0


def test_a_misses_steps_are_the_waits_between_its_stages_and_the_stages_less_the_model_call() -> None:
    from frugalstream.tools.bench.inside import STEPS, steps_ms

    with span_recorder() as spans:
        tracer = tracing.tracer()
        assert tracer is not None
        traced_miss(tracer, "r1", ((1_020, 1_035), (1_050, 1_058), (1_070, 1_400)), call=(1_075, 1_375))
        stage(tracer, "p.llm.requests", "r2", 1_000, 1_010)  # never reached the gateway: no steps
        found = steps_ms(spans, {f"p.{n}": n for n in ("llm.requests", "llm.requests.routed",
                                                        "llm.requests.dispatch")}, {"r1": 1.0, "r2": 1.0})
    got = {name: [round(v, 3) for v in values] for name, values in found.items()}
    assert got == dict(zip(STEPS, ([20.0], [15.0], [15.0], [8.0], [12.0], [30.0]), strict=True))


async def test_a_held_loop_and_a_full_collection_show_in_the_step_report() -> None:
    import gc
    import time

    from frugalstream.tools.bench.loop_watch import loop_watch

    async with loop_watch() as watch:
        await asyncio.sleep(0.01)
        time.sleep(0.05)  # noqa: ASYNC251 - holding the loop is what is measured
        gc.collect()
        await asyncio.sleep(0.01)
    rep = watch.report()
    assert rep["loop_stall_ms_max"] >= 45
    assert rep["loop_stalls_over_20ms"] == 1
    assert rep["gc_full_collections"] >= 1 and rep["gc_full_ms_max"] > 0
    assert gc.callbacks.count(watch.on_gc) == 0  # the watch leaves the collector as it found it
