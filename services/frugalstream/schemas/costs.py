"""Contracts of `llm.cost-events` (CloudEvents 1.0 structured mode) and `llm.budgets`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from frugalstream.schemas._base import Contract
from frugalstream.schemas.requests import TaskType
from frugalstream.schemas.responses import ResponseSource, Strategy, TokenUsage


class CostData(BaseModel):
    """Priced usage: the baseline, what was billed, and which strategy saved the difference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    usage_id: str
    request_id: str
    tenant: str
    stage: str
    task_type: TaskType | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    source: ResponseSource
    model: str | None
    baseline_model: str
    usage: TokenUsage | None
    items: int = 1
    baseline_cost_usd: float
    actual_cost_usd: float
    saved_usd: float
    savings_by_strategy: dict[Strategy, float]
    estimated: bool = Field(description="The billed usage was counted with tiktoken, not reported by the provider.")
    baseline_estimated: bool = Field(
        default=True, description="The counterfactual usage was estimated (it usually is: it never ran)."
    )
    batch: bool = False
    price_unknown: bool = Field(
        default=False,
        description="A model on the chain is missing from the price catalog: its tokens were priced at the "
                    "catalog's most expensive rates (a conservative figure for budgets), never dropped.",
    )
    unpriced_models: tuple[str, ...] = Field(default=(), description="The models the catalog could not price.")
    catalog_version: str
    simulated: bool = False


class CostEvent(Contract):
    """CloudEvents 1.0 envelope; `id` is derived from the usage id so analytics can deduplicate."""

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str = "frugalstream/accountant"
    type: Literal["io.frugalstream.cost.v1"] = "io.frugalstream.cost.v1"
    subject: str = Field(description="The tenant, so CloudEvents routers can filter without reading data.")
    time: str = Field(description="RFC 3339 time of the priced work.")
    datacontenttype: Literal["application/json"] = "application/json"
    data: CostData


class BudgetState(Contract):
    """Latest state of one budget on the compacted `llm.budgets` topic (key = budget id).

    A state speaks for its period only: once the period has ended it says nothing (`ends_at`), so a state the
    accountant no longer publishes (its budget was removed or changed period) cannot refuse a tenant for ever.
    Non-finite numbers are refused: a NaN `updated_at` would compare false against every later state.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = 1
    budget_id: str
    tenant: str
    tag: str | None = Field(default=None, description="`key=value` when the budget covers one tag only.")
    period: Literal["day", "month"]
    period_start: str = Field(description="RFC 3339 start of the period (UTC midnight).")
    limit_usd: float = Field(ge=0)
    spent_usd: float = Field(ge=0)
    status: Literal["ok", "near", "over"]
    action: Literal["none", "downgrade", "refuse"]
    updated_at: float = Field(ge=0, description="Unix seconds (the accountant's clock) when it was evaluated.")

    @model_validator(mode="after")
    def _a_period(self) -> BudgetState:
        """The start of a UTC day (the first of a month for a month) whose period ends in a representable time:
        a state whose end cannot be computed could never expire, and would fail every decision that reads it."""
        start = datetime.fromisoformat(self.period_start)
        if start.tzinfo is not None and start.utcoffset() != timedelta(0):
            raise ValueError("period_start must be UTC")
        if start.time() != datetime.min.time() or (self.period == "month" and start.day != 1):
            raise ValueError(f"period_start must be the start of a {self.period} (UTC midnight"
                             f"{', the 1st' if self.period == 'month' else ''}), got {self.period_start}")
        try:
            self.ends_at()
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"period_start {self.period_start}: the period's end is no time ({exc})") from None
        return self

    def ends_at(self) -> float:
        """Unix time the period ends (the next UTC day or month)."""
        start = datetime.fromisoformat(self.period_start).replace(tzinfo=UTC)
        if self.period == "day":
            return (start + timedelta(days=1)).timestamp()
        return (start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)).timestamp()
