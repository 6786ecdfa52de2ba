"""Tier and model selection: task floor, learned escalation score, tenant policy, budgets, pinned model."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

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


@dataclass
class BudgetBook:
    """Latest `llm.budgets` state per budget id, as the classifier last read it.

    The last state read wins, whatever its `updated_at`: the accountant is the topic's only writer, a key's
    states are read in the order written, and that order is what compaction keeps (a stamp from a clock that
    stepped back, or one in milliseconds, cannot hide a later state). A state whose period has ended says
    nothing (see `BudgetState.ends_at`)."""

    states: dict[str, BudgetState] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def update(self, state: BudgetState) -> None:
        self.states[state.budget_id] = state

    def verdict(self, tenant: str, tags: Mapping[str, str]) -> BudgetState | None:
        """The applicable state whose effect on `choose_model` is the strictest (see `severity`): ranking by
        status alone let a tenant-wide "downgrade when over" hide a tag's "refuse when over", and a near refuse
        budget (action none) hide a near downgrade. Ties go to the smallest budget id, so the answer does not
        depend on the order the states arrived in. Tag budgets apply only to tagged requests."""
        worst: BudgetState | None = None
        now = self.clock()
        for state in sorted(self.states.values(), key=lambda s: s.budget_id):
            if state.tenant != tenant or state.status == "ok" or state.ends_at() <= now:
                continue
            if state.tag is not None:
                key, _, value = state.tag.partition("=")
                if tags.get(key) != value:
                    continue
            if worst is None or severity(state) > severity(worst):
                worst = state
        return worst


def severity(state: BudgetState) -> int:
    """How hard `choose_model` acts on a state: 3 refuses (over + refuse), 2 caps at small (any other over),
    1 caps at mid (near + downgrade), 0 changes nothing (near without downgrade, ok)."""
    if state.status == "over":
        return 3 if state.action == "refuse" else 2
    return 1 if state.action == "downgrade" and state.status == "near" else 0


class PolicyDenied(Exception):
    """The tenant's policy or budget forbids serving this request; it becomes an error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ModelChoice:
    tier: Tier
    model: str
    fallbacks: tuple[str, ...]
    pinned: bool
    downgraded_by_budget: bool
    note: str


def tier_of_model(model: str, settings: Settings) -> Tier | None:
    for tier in TIERS:
        if model in settings.tiers.for_tier(tier):
            return tier
    return None


def choose_model(
    tier: Tier, pinned: str | None, policy: TenantPolicy, budget: BudgetState | None, settings: Settings,
) -> ModelChoice:
    downgraded = False
    note = ""
    if budget is not None:
        if budget.status == "over" and budget.action == "refuse":
            raise PolicyDenied("budget_exceeded", f"budget {budget.budget_id} is over its limit")
        if budget.action == "downgrade" or budget.status == "over":
            ceiling: Tier = "small" if budget.status == "over" else "mid"
            wanted = (tier_of_model(pinned, settings) or "large") if pinned is not None else tier
            if rank(wanted) > rank(ceiling):
                # A budget outranks a pinned model: the pin is dropped rather than overspending.
                tier, pinned, downgraded = ceiling, None, True
                note = f"budget {budget.budget_id} {budget.status}"
    tier = cap(tier, policy.max_tier)
    allowed = policy.allowed_models
    if pinned is not None:
        if allowed is not None and pinned not in allowed:
            raise PolicyDenied("policy_denied", f"model {pinned!r} is not allowed for this tenant")
        pinned_tier = tier_of_model(pinned, settings) or "large"
        if rank(pinned_tier) > rank(policy.max_tier):
            raise PolicyDenied("policy_denied", f"model {pinned!r} is above the tenant's maximum tier")
        return ModelChoice(pinned_tier, pinned, (), True, downgraded, "pinned")
    for candidate in (tier, *reversed(TIERS[: rank(tier)])):
        models = [m for m in settings.tiers.for_tier(candidate) if allowed is None or m in allowed]
        if models:
            return ModelChoice(candidate, models[0], tuple(models[1:]), False, downgraded, note)
    raise PolicyDenied("policy_denied", "no allowed model at or below the requested tier")
