"""A routing threshold that holds quality retained (issue 16): no move before the minimum sample, a broken
target tightens at once, loosening needs the lower bound to hold the target, gains of the cheap path count, and a
tenant's target moves only that tenant's threshold."""

from __future__ import annotations

import asyncio
import random
import time

from frugalstream.audit import quality
from frugalstream.audit.controller import Label, ThresholdController
from frugalstream.audit.logic import Auditor
from frugalstream.audit.quality import Graded
from frugalstream.llm.judges import llm_grade_messages, llm_judge_messages
from frugalstream.llm.providers.labelled import LabelledProvider
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import ChatMessage, SamplingParams
from frugalstream.schemas.audits import AuditAnswer, AuditRequest


def labels(n: int, *, fails_above: float, seed: int = 0) -> list[Label]:
    """Scores uniform in [0, 1); the baseline is always right; the cheap answer is right under `fails_above`
    and wrong above it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        score = rng.random()
        ok = score < fails_above
        out.append(Label(score, ok, 1.0, (ok, True)))
    return out


def controller(found: list[Label], tenant: str = "a") -> ThresholdController:
    c = ThresholdController(clock=lambda: 1.0)
    for i, lb in enumerate(found):
        c.observe(tenant, "chat", "route_mid", lb, key=str(i))
    return c


def test_the_controller_does_not_move_before_its_minimum_sample() -> None:
    bad = labels(199, fails_above=0.2)  # at 0.6, 40% of all requests are served wrong
    assert controller(bad).decide_quality("a", "chat", 0.6, 0.95, min_sample=200) is None
    change = controller(bad + labels(1, fails_above=0.2, seed=9)).decide_quality("a", "chat", 0.6, 0.95, 200)
    assert change is not None and change.reason == "bound_broken"


def test_a_broken_target_tightens_at_once_to_a_threshold_whose_lower_bound_holds() -> None:
    change = controller(labels(400, fails_above=0.3)).decide_quality("a", "chat", 0.8, 0.95, min_sample=200)
    assert change is not None and change.reason == "bound_broken"
    assert change.value <= 0.35 and change.low >= 0.95 and change.previous == 0.8


def test_loosening_needs_the_lower_bound_to_hold_the_target() -> None:
    fine = labels(1000, fails_above=0.5)  # quality fully kept up to 0.5, then lost
    loosened = controller(fine).decide_quality("a", "chat", 0.2, 0.95, min_sample=200)
    assert loosened is not None and loosened.reason == "evidence"
    assert 0.5 < loosened.value <= 0.56 and loosened.estimate >= 0.95
    # where it loosened to, its lower bound holds the target and nothing looser is proven: nothing moves
    assert loosened.low >= 0.95
    assert controller(fine).decide_quality("a", "chat", loosened.value, 0.95, min_sample=200) is None
    # a target the data cannot support: nothing loosens
    assert controller(fine).decide_quality("a", "chat", 0.2, 0.999, min_sample=200) is None


def test_cheap_answers_right_where_the_baseline_was_wrong_count_as_quality_kept() -> None:
    rng = random.Random(1)
    found = []
    for i in range(600):  # the cheap answer loses 10% of the time and wins 8% of the time
        kind = i % 50
        grades = (False, True) if kind < 5 else (True, False) if kind < 9 else (True, True)
        found.append(Label(rng.random(), grades[0] or not grades[1], 1.0, grades))
    graded = [lb.graded() for lb in found]
    everything_down = quality.at(quality.curve(graded), 1.1)
    assert abs(everything_down.rate - 45 / 46) < 1e-9  # per 50: the baseline right 46 times, the cheap path 45
    # routed-down acceptance (90%) misses a 95% target; quality retained holds it (97.6%)
    strict = controller(found).decide("a", "chat", "route_mid", 0.5, 0.95)
    assert strict is not None and strict.reason == "bound_broken"
    kept = controller(found).decide_quality("a", "chat", 0.5, 0.95, min_sample=200)
    assert kept is None or kept.reason == "evidence"


def test_weights_stand_for_the_unsampled_requests() -> None:
    # routed-down labels sampled at 10% (weight 10), routed-up at 100%: the estimate is over all requests
    graded = [Graded(0.1, 0.0, 1.0, 10.0)] + [Graded(0.1, 1.0, 1.0, 10.0)] * 9 + [Graded(0.9, 1.0, 1.0, 1.0)] * 100
    assert abs(quality.at(quality.curve(graded), 0.5).rate - (1 - 10 / 200)) < 1e-9


def audit(rid: str, tenant: str, score: float, cheap_ok: bool) -> AuditRequest:
    verdict = "accept" if cheap_ok else "reject"
    return AuditRequest(audit_id=f"audit-{tenant}-{rid}", tenant=tenant, request_id=rid, kind="routed_down",
                        task_type="chat", tier="small", score=score, threshold=0.9,
                        candidate=AuditAnswer(content="cheap"), reference=AuditAnswer(content="strong"),
                        judge_verdict=verdict, candidate_grade=verdict, reference_grade="accept",
                        sampled_at=time.time())


def test_a_tenants_quality_target_moves_only_that_tenants_threshold() -> None:
    settings = Settings(audit_rate=1.0, audit_judges={"default": "llm"}, audit_min_sample=50,
                        tenants={"a": TenantPolicy(quality_target=0.95)}, route_threshold_mid=0.9)
    auditor = Auditor(settings, {})
    rng = random.Random(2)
    scores = [rng.random() for _ in range(300)]
    batch = [audit(f"r{i}", tenant, s, s < 0.3) for i, s in enumerate(scores) for tenant in ("a", "b")]
    assert auditor.quality_target("a") == 0.95 and auditor.quality_target("b") is None
    _, changes = asyncio.run(auditor.judge(batch[:80]))  # 40 labels each: under a's minimum sample
    assert all(c.tenant == "b" for c in changes)
    assert auditor.current("a", "chat", "route_mid") == 0.9
    _, changes = asyncio.run(auditor.judge(batch[80:]))
    assert auditor.current("a", "chat", "route_mid") < 0.9
    assert {c.tenant for c in changes if c.reason == "bound_broken"} >= {"a"}


def test_the_labelled_provider_grades_one_answer_alone_from_the_labels() -> None:
    provider = LabelledProvider(outcomes={"q1": (False, True)}, weak_models=("weak",))

    async def ask(model: str, text: str) -> str:
        c = await provider.complete(model=model, messages=(ChatMessage(role="user", content=text),),
                                    sampling=SamplingParams(temperature=0))
        return c.content

    weak, strong = asyncio.run(ask("weak", "q1")), asyncio.run(ask("strong", "q1"))
    assert asyncio.run(ask("judge", llm_grade_messages("q1", weak)[1].content)).endswith("REJECT")
    assert asyncio.run(ask("judge", llm_grade_messages("q1", strong)[1].content)).endswith("ACCEPT")
    assert asyncio.run(ask("judge", llm_judge_messages("q1", weak, strong)[1].content)).endswith("REJECT")


def test_a_replayed_answer_is_sampled_like_the_paid_one_so_a_failed_publish_loses_no_audit() -> None:
    from frugalstream.gateway.audits import sample_paid
    from frugalstream.gateway.logic import Result
    from tests.unit.test_audits import SETTINGS, response, routed

    down = routed("d")
    paid = sample_paid(SETTINGS, [Result("k", down, "paid", response(down))])
    replayed = sample_paid(SETTINGS, [Result("k", down, "replayed", response(down))])
    assert len(paid) == 1 and len(replayed) == 1
    first, again = paid[0].value, replayed[0].value
    assert isinstance(first, AuditRequest) and isinstance(again, AuditRequest)
    assert again.audit_id == first.audit_id  # the same audit: paid once, counted once
