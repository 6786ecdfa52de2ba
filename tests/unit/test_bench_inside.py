"""`bench pipeline`'s time inside the services: a request's stage spans on the answer path, less its model call."""

from __future__ import annotations

from opentelemetry import trace

from frugalstream.runtime import tracing
from frugalstream.tools.bench.inside import inside_ms, span_recorder

MS = 1_000_000  # span times are in nanoseconds


def stage(tracer: trace.Tracer, topic: str, rid: str, start_ms: int, end_ms: int) -> trace.Span:
    span = tracer.start_span(f"process {topic}", start_time=start_ms * MS, attributes={
        "messaging.destination.name": topic, "frugalstream.request_id": rid, "frugalstream.tenant": "acme"})
    span.end(end_time=end_ms * MS)
    return span


def test_inside_time_sums_the_answer_path_and_leaves_out_the_model_call_and_other_topics() -> None:
    with span_recorder() as spans:
        tracer = tracing.tracer()
        assert tracer is not None
        stage(tracer, "p.llm.requests", "r1", 0, 10)
        stage(tracer, "p.llm.requests.routed", "r1", 60, 65)
        gateway = stage(tracer, "p.llm.requests.dispatch", "r1", 100, 420)
        call = tracer.start_span("chat gpt-4o-mini", context=trace.set_span_in_context(gateway), start_time=105 * MS)
        call.end(end_time=400 * MS)
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
