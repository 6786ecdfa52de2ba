"""What a tenant's budgets allow, as every service that spends for a tenant reads them from `llm.budgets`:
the classifier for requests, the summarizer for backfill parts. One rule, so a budget caps both alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from frugalstream.schemas import BudgetState, Tier

__all__ = ["BudgetBook", "budget_ceiling", "refuses", "severity"]


@dataclass
class BudgetBook:
    """Latest `llm.budgets` state per budget id, as this service last read it, indexed by tenant.

    The last state read wins, whatever its `updated_at`: the accountant is the topic's only writer, a key's
    states are read in the order written, and that order is what compaction keeps (a stamp from a clock that
    stepped back, or one in milliseconds, cannot hide a later state). A state whose period has ended says
    nothing (see `BudgetState.ends_at`). A verdict reads only its tenant's states: it runs for every request,
    on the event loop, and a deployment may hold thousands of budgets."""

    states: dict[str, BudgetState] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.time, repr=False)
    _by_tenant: dict[str, dict[str, BudgetState]] = field(default_factory=dict, init=False, repr=False)
    _order: dict[str, list[str]] = field(default_factory=dict, init=False, repr=False)  # budget ids, sorted

    def __post_init__(self) -> None:
        for state in self.states.values():
            self._index(state)

    def update(self, state: BudgetState) -> None:
        previous = self.states.get(state.budget_id)
        if previous is not None and previous.tenant != state.tenant:  # the budget id is now another tenant's
            del self._by_tenant[previous.tenant][state.budget_id]
            self._order.pop(previous.tenant, None)
        self.states[state.budget_id] = state
        self._index(state)

    def _index(self, state: BudgetState) -> None:
        of_tenant = self._by_tenant.setdefault(state.tenant, {})
        if state.budget_id not in of_tenant:
            self._order.pop(state.tenant, None)
        of_tenant[state.budget_id] = state

    def _of(self, tenant: str) -> list[BudgetState]:
        """The tenant's states in budget id order (the order is kept until the tenant's set of budgets changes)."""
        of_tenant = self._by_tenant.get(tenant)
        if not of_tenant:
            return []
        order = self._order.get(tenant)
        if order is None:
            order = self._order[tenant] = sorted(of_tenant)
        return [of_tenant[budget_id] for budget_id in order]

    def verdict(self, tenant: str, tags: Mapping[str, str]) -> BudgetState | None:
        """The applicable state whose effect on a call is the strictest (see `severity`): ranking by
        status alone let a tenant-wide "downgrade when over" hide a tag's "refuse when over", and a near refuse
        budget (action none) hide a near downgrade. Ties go to the smallest budget id, so the answer does not
        depend on the order the states arrived in. Tag budgets apply only to tagged requests."""
        worst: BudgetState | None = None
        now = self.clock()
        for state in self._of(tenant):
            if state.status == "ok" or state.ends_at() <= now:
                continue
            if state.tag is not None:
                key, _, value = state.tag.partition("=")
                if tags.get(key) != value:
                    continue
            if worst is None or severity(state) > severity(worst):
                worst = state
        return worst


def severity(state: BudgetState) -> int:
    """How hard a state binds a call: 3 refuses (over + refuse), 2 caps at small (any other over),
    1 caps at mid (near + downgrade), 0 changes nothing (near without downgrade, ok)."""
    if state.status == "over":
        return 3 if state.action == "refuse" else 2
    return 1 if state.action == "downgrade" and state.status == "near" else 0


def refuses(state: BudgetState) -> bool:
    """An over budget whose action is refuse: nothing more is spent under it this period."""
    return state.status == "over" and state.action == "refuse"


def budget_ceiling(state: BudgetState) -> Tier | None:
    """The highest tier the state lets a call use: small once over, mid when near with action downgrade, else
    no cap (a refusing over budget refuses first: see `refuses`)."""
    if state.status == "over":
        return "small"
    return "mid" if state.status == "near" and state.action == "downgrade" else None
