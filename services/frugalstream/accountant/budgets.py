"""Budgets: per tenant (optionally one `key=value` tag), per UTC day or month, with a limit and an action.

The accountant evaluates them against the ledger after pricing and publishes `BudgetState` to the compacted
`llm.budgets` topic; the classifier reads it to downgrade or refuse. Periods start at UTC midnight / the
first of the month in UTC, so every instance and every time zone agrees on which spend counts.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from frugalstream.runtime.logging import get_logger
from frugalstream.schemas import BudgetState

log = get_logger(__name__)

Period = Literal["day", "month"]
Status = Literal["ok", "near", "over"]
Action = Literal["none", "downgrade", "refuse"]


class SpendSource(Protocol):
    """What a tracker needs from the ledger (a fake in tests)."""

    def spent(self, tenant: str, tag: str | None, since: float, until: float) -> float: ...


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(default=None, min_length=1, description="Stable key on `llm.budgets`; derived if unset.")
    tenant: str = Field(min_length=1)
    tag: str | None = Field(default=None, pattern=r"^[^=]+=.*$", description="`key=value`: only spend with that tag.")
    period: Period
    limit_usd: float = Field(ge=0)
    near_pct: float = Field(default=80.0, gt=0, le=100)
    action: Literal["downgrade", "refuse"] = "downgrade"

    @property
    def budget_id(self) -> str:
        return self.id or f"{self.tenant}/{self.tag or '*'}/{self.period}"


class BudgetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budgets: tuple[Budget, ...] = ()

    @model_validator(mode="after")
    def _unique_ids(self) -> BudgetsConfig:
        ids = [b.budget_id for b in self.budgets]
        if dups := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"duplicate budget ids: {dups}")
        return self

    @classmethod
    def from_file(cls, path: Path, default_action: Literal["downgrade", "refuse"] = "downgrade") -> BudgetsConfig:
        """`.toml` (`[[budgets]]` tables) or `.json` (`{"budgets": [...]}`); a budget that names no `action` takes
        `default_action` (the `budget_action` setting)."""
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("budgets"), list):
            data["budgets"] = [{"action": default_action, **b} if isinstance(b, dict) else b for b in data["budgets"]]
        return cls.model_validate(data)


def period_start(period: Period, now: float) -> datetime:
    t = datetime.fromtimestamp(now, tz=UTC)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return start.replace(day=1) if period == "month" else start


def period_end(period: Period, now: float) -> datetime:
    """The next period's start: spend stamped at or after it (a producer's clock ahead, or a typo'd year) is not
    this period's, or it would count against every period until then."""
    start = period_start(period, now)
    if period == "day":
        return start + timedelta(days=1)
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


def status_of(spent: float, limit: float, near_pct: float) -> Status:
    """A zero limit is `over` at once: it freezes the scope, which is what a zero budget means."""
    if spent >= limit:
        return "over"
    return "near" if spent >= limit * near_pct / 100.0 else "ok"


def action_of(budget: Budget, status: Status) -> Action:
    """Over: the configured action. Near: downgrade only on downgrade budgets (refuse is a hard stop, not a
    quality change). Ok: none."""
    if status == "over":
        return budget.action
    return "downgrade" if status == "near" and budget.action == "downgrade" else "none"


class BudgetTracker:
    """Evaluates budgets and remembers what was last *published*, so only transitions need publishing.

    Two steps, so a failed publish is not forgotten: `pending` returns the states that differ from what was
    published (it changes nothing), and `mark_published` records them once the broker acknowledged them. A
    publish that fails leaves them pending, and the next evaluation (the next batch or the next tick) returns
    them again. Not thread-safe: one call at a time (the accountant serialises them under one lock).
    """

    def __init__(self, config: BudgetsConfig | Sequence[Budget]) -> None:
        self._budgets = config.budgets if isinstance(config, BudgetsConfig) else tuple(config)
        self._published: dict[str, tuple[str, Status, Action]] = {}

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self._budgets

    def state(self, budget: Budget, ledger: SpendSource, now: float) -> BudgetState:
        start = period_start(budget.period, now)
        until = period_end(budget.period, now)
        spent = max(0.0, ledger.spent(budget.tenant, budget.tag, start.timestamp(), until.timestamp()))
        status = status_of(spent, budget.limit_usd, budget.near_pct)
        return BudgetState(
            budget_id=budget.budget_id, tenant=budget.tenant, tag=budget.tag, period=budget.period,
            period_start=start.isoformat().replace("+00:00", "Z"), limit_usd=budget.limit_usd,
            spent_usd=spent, status=status, action=action_of(budget, status), updated_at=now,
        )

    def _evaluate(self, budget: Budget, ledger: SpendSource, now: float) -> BudgetState | None:
        try:
            return self.state(budget, ledger, now)
        except Exception as exc:
            log.error("budget_evaluation_failed", budget_id=budget.budget_id, tenant=budget.tenant,
                      error_type=type(exc).__name__, error=str(exc)[:500])
            return None

    @staticmethod
    def _decision(state: BudgetState) -> tuple[str, Status, Action]:
        return state.period_start, state.status, state.action

    def pending(self, ledger: SpendSource, now: float, *, only_changed: bool = True) -> list[BudgetState]:
        """States to publish; records nothing (see `mark_published`).

        With `only_changed` (the default) a state is returned when its period, status or action differs from
        what was last marked published, which includes every budget before the first publish (so a restarted
        accountant republishes all of them) and every budget whose period rolled over. Spend growing within a
        status is not a change: the compacted topic carries decisions, the ledger carries amounts.
        `only_changed=False` returns every state.

        Each budget is evaluated on its own: one that fails (its ledger query raised) is logged and left out,
        so it stays pending until an evaluation succeeds, and never keeps the other budgets, of any tenant, from
        being published.
        """
        states = [st for budget in self._budgets if (st := self._evaluate(budget, ledger, now)) is not None]
        if not only_changed:
            return states
        return [st for st in states if self._published.get(st.budget_id) != self._decision(st)]

    def mark_published(self, states: Sequence[BudgetState]) -> None:
        """Call only after the broker acknowledged `states`."""
        for st in states:
            self._published[st.budget_id] = self._decision(st)
