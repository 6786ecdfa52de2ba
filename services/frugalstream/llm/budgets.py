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
    """Latest `llm.budgets` state per budget id, as this service last read it.

    The last state read wins, whatever its `updated_at`: the accountant is the topic's only writer, a key's
    states are read in the order written, and that order is what compaction keeps (a stamp from a clock that
    stepped back, or one in milliseconds, cannot hide a later state). A state whose period has ended says
    nothing (see `BudgetState.ends_at`)."""

    states: dict[str, BudgetState] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def update(self, state: BudgetState) -> None:
        self.states[state.budget_id] = state

    def verdict(self, tenant: str, tags: Mapping[str, str]) -> BudgetState | None:
        """The applicable state whose effect on a call is the strictest (see `severity`): ranking by
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
