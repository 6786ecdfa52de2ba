"""An audit runs only where the tenant's own request could have run: its counterfactual call and its LLM judge
read the tenant's prompt and are billed to the tenant, so a model outside `allowed_models` or above `max_tier`
(often a data-residency or compliance limit), or above the tier a budget downgrade capped the request to, never
sees it. Such an audit is skipped before any call (logged with its reason) and is never a label."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from structlog.testing import capture_logs

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.audit_sampling import AuditSampler
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.gateway.audits import AuditCalls, InProcessCompleted, sample_paid
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.providers import Completion
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import BudgetState, ChatMessage, LLMRequest, RoutedRequest, TokenUsage
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRequest
from tests.scenarios import today
from tests.unit.test_audits import SETTINGS, entry, response, routed

RESTRICTED = TenantPolicy(allowed_models=("gpt-4o-mini",), max_tier="small")


class Asked:
    """Answers every call; records the model asked and the text it was shown."""

    name = "simulated"

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.shown: list[str] = []

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], **_: Any) -> Completion:
        self.asked.append(model)
        self.shown.extend(m.content for m in messages)
        return Completion(content="ACCEPT", model=model, usage=TokenUsage(input_tokens=7, output_tokens=3),
                          finish_reason="stop", latency_ms=1.0, simulated=True)

    async def aclose(self) -> None:
        return None


async def _routed(settings: Settings, text: str = "When do you open?", budgets: BudgetBook | None = None,
                  ) -> RoutedRequest:
    classifier = Classifier(settings, TokenCounter(), budgets=budgets or BudgetBook())
    [result] = await classifier.handle([LLMRequest(id="r1", tenant="acme",
                                                   messages=(ChatMessage(role="user", content=text),))])
    assert isinstance(result, Routed), result
    return result.routed


def _audits(settings: Settings, r: RoutedRequest) -> list[AuditRequest]:
    outs = sample_paid(settings, [Result("k", r, "paid", response(r))])
    return [o.value for o in outs if isinstance(o.value, AuditRequest)]


def _skips(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "audit_skipped"]


async def _dispatch(calls: AuditCalls, audit: AuditRequest) -> list[Out]:
    record = Record(t.AUDITS_DISPATCH, 0, 0, None, None, ())
    return await calls.on_dispatch([Decoded(record, audit)], BatchContext())


async def test_an_audit_never_sends_a_tenants_prompt_to_a_model_its_policy_forbids() -> None:
    settings = SETTINGS.model_copy(update={"tenants": {"acme": RESTRICTED}})
    r = await _routed(settings)
    assert r.route.model == "gpt-4o-mini" and r.route.baseline_model == "gpt-4o"  # routed down, within policy
    with capture_logs() as logs:
        audits = _audits(settings, r)
    assert [a.job.route.model for a in audits if a.job is not None] == []  # its baseline is walled off: skipped
    assert _skips(logs) == ["model_not_allowed"]
    assert _audits(SETTINGS, r), "the same request of an unrestricted tenant is audited"


async def test_an_audit_never_runs_above_the_tenants_max_tier() -> None:
    capped = SETTINGS.model_copy(update={"tenants": {"acme": TenantPolicy(max_tier="mid")}})
    mid = routed("m", model="gpt-4.1-mini", tier="mid")
    with capture_logs() as logs:
        assert _audits(capped, mid) == []  # its baseline (large) is above what the tenant may use
    assert _skips(logs) == ["above_max_tier"]
    assert _audits(SETTINGS, mid)


async def test_a_routed_up_audit_runs_on_the_cheapest_model_the_tenant_may_use_or_not_at_all() -> None:
    big = routed("u", model="gpt-4o", tier="large", score=0.9)
    up = SETTINGS.model_copy(update={"audit_rates": {"routed_up": 1.0}})
    nano = up.model_copy(update={"tenants": {"acme": TenantPolicy(allowed_models=("gpt-4o", "gpt-4.1-nano"))}})
    [audit] = _audits(nano, big)
    assert audit.kind == "routed_up" and audit.job is not None and audit.job.route.model == "gpt-4.1-nano"
    only_large = up.model_copy(update={"tenants": {"acme": TenantPolicy(allowed_models=("gpt-4o",))}})
    with capture_logs() as logs:
        assert _audits(only_large, big) == []
    assert _skips(logs) == ["model_not_allowed"]


async def test_an_audit_of_a_budget_downgraded_request_does_not_spend_above_the_budgets_ceiling() -> None:
    book = BudgetBook()
    book.update(BudgetState(budget_id="b", tenant="acme", period="day", period_start=today(), limit_usd=1,
                            spent_usd=2, status="over", action="downgrade", updated_at=1.0))
    r = await _routed(SETTINGS, "Write a python function that sorts a list", book)
    assert r.route.downgraded_by_budget and r.route.tier == "small"  # code's floor is mid: the budget capped it
    with capture_logs() as logs:
        assert _audits(SETTINGS, r) == []
    assert _skips(logs) == ["above_budget_ceiling"]
    assert _audits(SETTINGS, await _routed(SETTINGS, "Write a python function that sorts a list")), \
        "without the budget the routed-down request is audited"


async def test_an_llm_judge_on_a_model_the_tenant_may_not_use_never_sees_its_text() -> None:
    judged = SETTINGS.model_copy(update={"audit_judges": {"default": "llm"}, "audit_judge_model": "gpt-4o-mini"})
    mid = routed("m", text="secret plan", model="gpt-4.1-mini", tier="mid")
    [audit] = _audits(judged, mid)  # sampled while the tenant could use the judge's model
    walled = judged.model_copy(update={"tenants": {"acme": TenantPolicy(allowed_models=("gpt-4.1-mini", "gpt-4o"))}})
    with capture_logs() as logs:
        assert _audits(walled, mid) == []
    assert _skips(logs) == ["judge_model_not_allowed"]
    provider = Asked()
    with capture_logs() as logs:
        outs = await _dispatch(AuditCalls(walled, Gateway({"simulated": provider}, InProcessCompleted())), audit)
    assert provider.asked == [] and outs == []  # no call whose answer no judge could read, no label
    assert _skips(logs) == ["judge_model_not_allowed"]


async def test_a_cache_audit_for_a_tenant_whose_policy_forbids_the_baseline_is_never_called() -> None:
    settings = SETTINGS.model_copy(update={"tenants": {"acme": RESTRICTED}})
    r = routed("r2", text="what time do you open")
    hit = AuditSampler(settings).on_hit(r, SemanticHit(entry(routed("r1"), "We open at 9."), 0.93, 0.95, 0.89))
    assert hit is not None and hit.request.job is not None and hit.request.job.route.model == "gpt-4o"
    provider = Asked()
    with capture_logs() as logs:
        outs = await _dispatch(AuditCalls(settings, Gateway({"simulated": provider}, InProcessCompleted())),
                               hit.request)
    assert provider.asked == [] and outs == []
    assert _skips(logs) == ["model_not_allowed"]
