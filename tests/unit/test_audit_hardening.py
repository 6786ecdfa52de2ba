"""The audit loop under hostile input (issue 16): a non-finite score never wedges the audit stage, a loosened
threshold never admits a label it did not count, and one tenant's audits never undo another's verdicts."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from frugalstream.audit import quality
from frugalstream.audit.app import AuditService
from frugalstream.audit.controller import Label, ThresholdController, acceptance_at
from frugalstream.audit.logic import Auditor, Cell
from frugalstream.audit.quality import Graded
from frugalstream.llm.audits import answers_digest, audit_id
from frugalstream.llm.judges import MatchJudge
from frugalstream.runtime.messaging import decode
from frugalstream.runtime.records import Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditAnswer, AuditRecord, AuditRequest, Knob, ReviewVerdict, Verdict

SETTINGS = Settings(audit_rate=1.0, audit_judges={"default": "match"}, semantic_verifier="features")
NAN, INF = float("nan"), float("inf")


class Wedged(Exception):
    pass


@contextmanager
def returns_within(seconds: int, what: str) -> Iterator[None]:
    """Fails the test (instead of hanging the suite) when the block loops forever."""
    def _alarm(*_: object) -> None:
        raise Wedged

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    except Wedged:
        pytest.fail(f"{what} never returned: the audit stage is wedged")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def answered(rid: str, candidate: str = "Paris", reference: str = "paris", tenant: str = "acme",
             score: float = 0.95) -> AuditRequest:
    return AuditRequest(audit_id=audit_id(tenant, rid, "cache_semantic"), tenant=tenant, request_id=rid,
                        kind="cache_semantic", task_type="faq", question="q", score=score, threshold=0.89,
                        rule="verifier", candidate=AuditAnswer(content=candidate),
                        reference=AuditAnswer(content=reference), sampled_at=1.0)


def review(a: AuditRequest, verdict: Verdict) -> ReviewVerdict:
    assert a.candidate is not None and a.reference is not None
    return ReviewVerdict(audit_id=a.audit_id, tenant=a.tenant, verdict=verdict,
                         answers_sha256=answers_digest(a.candidate, a.reference), reviewed_at=2.0)


# --- 1. a non-finite score ------------------------------------------------------------------------------------------

def raw(a: AuditRequest, field: str, value: str) -> bytes:
    """`a` as it arrives on the topic, `field` set to a JSON literal pydantic would otherwise read as a float."""
    return json.dumps({**a.model_dump(mode="json"), field: "VALUE"}).replace('"VALUE"', value).encode()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["score", "threshold"])
def test_a_non_finite_score_or_threshold_is_refused_by_the_audit_contracts(field: str, value: str) -> None:
    good, bad = decode([Record(t.AUDITS_ANSWERED, 0, 0, b"acme", raw(answered("x"), field, value), ())],
                       AuditRequest, max_bytes=SETTINGS.max_message_bytes)
    assert good == [] and len(bad) == 1  # dead-lettered, never judged
    record = {"audit_id": "a", "tenant": "acme", "request_id": "x", "kind": "cache_semantic", "task_type": "faq",
              "candidate": {"content": "a"}, "reference": {"content": "a"}, "judge": "match", "verdict": "accept",
              "estimate": {"tenant": "acme", "task_type": "faq", "kind": "cache_semantic", "n": 1, "accepted": 1,
                           "rate": 1.0, "low": 0.2, "high": 1.0}, "judged_at": 1.0, field: "VALUE"}
    with pytest.raises(ValueError):  # a restart's read of `llm.audits` skips it too
        AuditRecord.model_validate_json(json.dumps(record).replace('"VALUE"', value))


async def test_the_audit_stage_dead_letters_a_nan_score_and_judges_the_next_audit() -> None:
    settings = SETTINGS.model_copy(update={"audit_min_evidence": 3})
    service = AuditService(settings, Auditor(settings, {"match": MatchJudge()}))
    values = [answered(f"ok{i}", score=0.9 + i / 100).model_dump_json().encode() for i in range(5)]
    values += [raw(answered("nan", "Paris", "Lyon"), "score", "NaN"), answered("later").model_dump_json().encode()]
    with returns_within(5, "judging a batch holding a NaN score"):
        good, bad = decode([Record(t.AUDITS_ANSWERED, 0, i, b"acme", v, ()) for i, v in enumerate(values)],
                           AuditRequest, max_bytes=settings.max_message_bytes)
        outs = await service._on_answered(good, BatchContext())
    assert len(bad) == 1 and [o.topic for o in outs].count(t.AUDITS) == 6


def mixed(knob: Knob, junk: list[Label]) -> list[Label]:
    base = [Label(i / 400, i < 300, 1.0, (i < 300, True)) for i in range(400)]
    if knob == "semantic_verify":
        base = [Label(0.6 + i / 1000, i >= 100) for i in range(400)]
    return base[:150] + junk + base[150:]


@pytest.mark.parametrize("junk", [[Label(NAN, False)], [Label(INF, False), Label(-INF, False)],
                                  [Label(0.5, False, NAN)], [Label(-0.5, False, 0.0)]])
def test_a_stored_non_finite_label_never_wedges_a_cell_nor_moves_its_threshold(junk: list[Label]) -> None:
    cases: tuple[tuple[Knob, float, float], ...] = (("route_mid", 0.12, 0.95), ("semantic_verify", 0.9, 0.98))
    for knob, current, target in cases:
        clean, dirty = ThresholdController(clock=lambda: 1.0), ThresholdController(clock=lambda: 1.0)
        for i, lb in enumerate(mixed(knob, [])):
            clean.observe("a", "chat", knob, lb, key=str(i))
        for i, lb in enumerate(mixed(knob, junk)):
            dirty.observe("a", "chat", knob, lb, key=str(i))
        with returns_within(5, f"deciding {knob} on a cell holding {junk}"):
            assert dirty.decide("a", "chat", knob, current, target) == clean.decide("a", "chat", knob, current, target)
            if knob == "route_mid":
                assert dirty.decide_quality("a", "chat", current, target, 200) == \
                    clean.decide_quality("a", "chat", current, target, 200)


def test_the_threshold_search_steps_past_a_nan_score_instead_of_looping_on_it() -> None:
    c = ThresholdController(min_evidence=3)
    for labels in ([Label(NAN, True)], [Label(0.1, True)] * 5 + [Label(NAN, True)] + [Label(0.2, True)] * 5):
        with returns_within(5, "the tie loop over a NaN score"):
            c._most_permissive_holding(labels, "route_mid", 0.5)
            c._most_permissive_holding(labels, "semantic_verify", 0.5)


def test_quality_retained_ignores_a_non_finite_label() -> None:
    clean = [Graded(i / 400, float(i < 300), 1.0) for i in range(400)]
    dirty = [*clean[:150], Graded(NAN, 0.0, 1.0), Graded(INF, 0.0, 1.0), Graded(0.5, 0.0, 1.0, NAN), *clean[150:]]
    with returns_within(5, "the quality curve over a NaN score"):
        assert quality.decide(dirty, 0.12, 0.95, 200) == quality.decide(clean, 0.12, 0.95, 200)
        assert quality.decide(dirty, 0.9, 0.95, 200) == quality.decide(clean, 0.9, 0.95, 200)


# --- 2. loosening only over counted labels ---------------------------------------------------------------------------

def test_a_loosened_route_mid_threshold_admits_only_labels_it_counted() -> None:
    c = ThresholdController(min_evidence=30)
    for i in range(60):  # routed down and accepted at escalation score 0.1
        c.observe("acme", "faq", "route_mid", Label(0.1, True), key=f"ok{i}")
    for i in range(10):  # rejected, scored just above (within STEP of 0.1)
        c.observe("acme", "faq", "route_mid", Label(0.10001 + i * 1e-6, False), key=f"bad{i}")
    labels = c.labels("acme", "faq", "route_mid")
    change = c.decide("acme", "faq", "route_mid", current=0.05, target=0.9)
    assert change is not None and change.reason == "evidence"
    taken = acceptance_at(labels, "route_mid", change.value)
    assert taken.low >= 0.9 and change.n == taken.n and change.low == round(taken.low, 6)
    assert c.decide("acme", "faq", "route_mid", current=change.value, target=0.9) is None  # and it holds there


def test_a_loosened_quality_threshold_admits_only_labels_it_counted() -> None:
    labels = [Graded(0.1, 1.0, 1.0) for _ in range(300)]  # routed down at 0.1, as good as the baseline
    labels += [Graded(0.10001 + i * 1e-7, 0.0, 1.0) for i in range(100)]  # just above: the cheap answer was wrong
    found = quality.decide(labels, current=0.05, target=0.95, min_sample=200)
    assert found is not None and found[1] == "evidence"
    served = sum(g.cheap if g.score < found[0] else g.baseline for g in labels)
    assert served / sum(g.baseline for g in labels) >= 0.95 and found[2].down == sum(g.score < found[0] for g in labels)


def retained(labels: list[Label], threshold: float) -> float:
    return sum(lb.accepted if lb.score < threshold else 1.0 for lb in labels) / len(labels)


def test_rounding_never_moves_a_threshold_onto_a_label_it_did_not_count() -> None:
    # route_mid, broken: just past the worst rejected label, never rounded up onto it
    broken = ThresholdController(min_evidence=30)
    for i in range(40):
        broken.observe("a", "chat", "route_mid", Label(0.1 + i / 1000, True), key=f"ok{i}")
    broken.observe("a", "chat", "route_mid", Label(0.3000006, False), key="bad")
    change = broken.decide("a", "chat", "route_mid", current=0.5, target=0.99)
    assert change is not None and change.reason == "bound_broken" and change.value <= 0.3000006
    # semantic_verify, loosened: at the counted label's score, never rounded down onto the lower, rejected ones
    above = ThresholdController(min_evidence=30)
    for i in range(60):
        above.observe("a", "faq", "semantic_verify", Label(0.9000004, True), key=f"ok{i}")
        above.observe("a", "faq", "semantic_verify", Label(0.9000001, False), key=f"bad{i}")
    change = above.decide("a", "faq", "semantic_verify", current=0.95, target=0.9)
    assert change is not None and change.value > 0.9000001
    # quality retained, loosened: the point's threshold is between two scores 4e-7 apart, rounded down
    graded = ThresholdController(clock=lambda: 1.0)
    for i in range(300):
        graded.observe("a", "chat", "route_mid", Label(0.1000005, True, 1.0, (True, True)), key=f"ok{i}")
    for i in range(100):
        graded.observe("a", "chat", "route_mid", Label(0.1000009, False, 1.0, (False, True)), key=f"bad{i}")
    change = graded.decide_quality("a", "chat", current=0.05, target=0.95, min_sample=200)
    assert change is None or retained(graded.labels("a", "chat", "route_mid"), change.value) >= 0.95


# --- 3. tenants ----------------------------------------------------------------------------------------------------

CELL: Cell = ("acme", "faq", "cache_semantic")


def auditor(recent_max: int) -> Auditor:
    return Auditor(SETTINGS.model_copy(update={"audit_calibrate": False}), {"match": MatchJudge()},
                   recent_max=recent_max)


async def test_another_tenants_volume_never_evicts_a_tenants_audits_from_review() -> None:
    a = auditor(50)
    x = answered("x", "Paris", "Lyon")
    await a.judge([x])
    await a.judge([answered(f"b{i}", "a", "a", "evil") for i in range(50)])  # another tenant's traffic
    records, _ = a.review([review(x, "accept")])  # acme's reviewer, acme's audit
    assert records and records[0].judge == "human" and a.estimates.estimate(CELL).accepted == 1


async def test_another_tenants_volume_never_lets_a_redelivery_undo_a_persons_verdict() -> None:
    a = auditor(50)
    x = answered("x", "Paris", "Lyon")  # the machine rejects it
    await a.judge([x])
    a.review([review(x, "accept")])  # a person accepts it
    await a.judge([answered(f"b{i}", "a", "a", "evil") for i in range(50)])
    assert (await a.judge([x]))[0] == []  # at-least-once: the same audit again
    assert a.estimates.estimate(CELL).accepted == 1
    assert [lb.accepted for lb in a.controller.labels("acme", "faq", "semantic_verify")] == [True]


async def test_a_redelivered_audit_counted_in_its_cell_is_never_judged_again_once_forgotten() -> None:
    a = auditor(2)
    x = answered("x", "Paris", "Lyon")
    await a.judge([x])
    await a.judge([answered("y"), answered("z")])  # the tenant's own volume: x leaves the dedupe memory
    assert x.audit_id not in a.recent
    assert (await a.judge([x]))[0] == []  # not judged, not published again
    assert a.estimates.estimate(CELL).n == 3


async def test_a_machine_verdict_never_replaces_a_persons_even_once_forgotten() -> None:
    a = auditor(1)
    x = answered("x", "Paris", "Lyon")
    [machine], _ = await a.judge([x])
    a.review([review(x, "accept")])
    await a.judge([answered("y")])  # x leaves the dedupe memory
    assert a.restore([machine]) == 0  # the machine's record of x read again (a restart, a re-judged copy)
    assert a.estimates.estimate(CELL).accepted == 2
    assert all(lb.accepted for lb in a.controller.labels("acme", "faq", "semantic_verify"))
