"""Tier and model selection: task floor, learned escalation score, tenant policy, budgets, pinned model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from frugalstream.llm.budgets import budget_ceiling, refuses
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import TIERS, BudgetState, Route, TaskType, Tier


class TierThresholds(BaseModel):
    """Escalation score at or above which a request goes to mid / large. `frugalstream calibrate` writes these."""

    model_config = ConfigDict(frozen=True)

    mid: float = 0.55
    large: float = 0.75


# The cheapest tier each task type may use, whatever the score says; the score can only raise it.
TASK_FLOOR: Mapping[TaskType, Tier] = {
    "faq": "small", "classification": "small", "extraction": "small", "chat": "small",
    "summarization": "small", "drafting": "small", "creative": "small", "code": "mid", "reasoning": "mid",
}
# Long inputs are harder for small models regardless of topic.
LONG_INPUT_TOKENS = 6_000


def rank(tier: Tier) -> int:
    return TIERS.index(tier)


def cap(tier: Tier, maximum: Tier) -> Tier:
    return tier if rank(tier) <= rank(maximum) else maximum


@dataclass(frozen=True)
class TierDecision:
    tier: Tier
    reason: str


def decide_tier(
    task: TaskType, score: float | None, input_tokens: int, thresholds: TierThresholds,
) -> TierDecision:
    floor = TASK_FLOOR[task]
    by_score: Tier = "small"
    if score is not None:
        by_score = "large" if score >= thresholds.large else "mid" if score >= thresholds.mid else "small"
    tier = max(floor, by_score, key=rank)
    reason = f"floor={floor} score={'n/a' if score is None else f'{score:.2f}'}"
    if input_tokens > LONG_INPUT_TOKENS and rank(tier) < rank("mid"):
        tier, reason = "mid", reason + " long_input"
    return TierDecision(tier, reason)


def reason_kind(route: Route) -> str:
    """What set a routed request's tier, as a bounded metric label: pinned, budget, policy (below the task's
    floor: the tenant's max tier or allowed models), long_input (`decide_tier` bumped it to mid), score (above
    the floor) or floor."""
    if route.pinned:
        return "pinned"
    if route.downgraded_by_budget:
        return "budget"
    floor = TASK_FLOOR[route.task_type]
    if rank(route.tier) < rank(floor):
        return "policy"
    if "long_input" in route.reason.split():
        return "long_input" if route.tier == "mid" else "policy"
    return "score" if rank(route.tier) > rank(floor) else "floor"


class PolicyDenied(Exception):
    """The tenant's policy or budget forbids serving this request; it becomes an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def budget_refusal(budget: BudgetState | None) -> str | None:
    """Why `budget` refuses spend, or None when it does not (see `refuses`)."""
    return f"budget {budget.budget_id} is over its limit" if budget is not None and refuses(budget) else None


@dataclass(frozen=True)
class ModelChoice:
    tier: Tier
    model: str
    fallbacks: tuple[str, ...]
    pinned: bool
    downgraded_by_budget: bool
    note: str


def choose_model(
    tier: Tier, pinned: str | None, policy: TenantPolicy, budget: BudgetState | None, settings: Settings,
) -> ModelChoice:
    downgraded = False
    note = ""
    if budget is not None:
        if (refusal := budget_refusal(budget)) is not None:
            raise PolicyDenied("budget_exceeded", refusal)
        ceiling = budget_ceiling(budget)
        if ceiling is not None:
            wanted = settings.tiers.tier_of(pinned) if pinned is not None else tier
            if rank(wanted) > rank(ceiling):
                # A budget outranks a pinned model: the pin is dropped rather than overspending.
                tier, pinned, downgraded = ceiling, None, True
                note = f"budget {budget.budget_id} {budget.status}"
    tier = cap(tier, policy.max_tier)
    allowed = policy.allowed_models
    if pinned is not None:
        if allowed is not None and pinned not in allowed:
            raise PolicyDenied("policy_denied", f"model {pinned!r} is not allowed for this tenant")
        pinned_tier = settings.tiers.tier_of(pinned)
        if rank(pinned_tier) > rank(policy.max_tier):
            raise PolicyDenied("policy_denied", f"model {pinned!r} is above the tenant's maximum tier")
        return ModelChoice(pinned_tier, pinned, (), True, downgraded, "pinned")
    for candidate in (tier, *reversed(TIERS[: rank(tier)])):
        models = [m for m in settings.tiers.for_tier(candidate) if allowed is None or m in allowed]
        if models:
            return ModelChoice(candidate, models[0], tuple(models[1:]), False, downgraded, note)
    raise PolicyDenied("policy_denied", "no allowed model at or below the requested tier")
