"""Prices a usage record's counterfactual chain and attributes the difference to strategies.

Each point of the chain (baseline, then one step per strategy) is priced exactly (a model the catalog lacks at
the catalog's most expensive rates, flagged `price_unknown`); the saving of a step is the price of the previous
point minus its own. The differences telescope, so in Decimal
`baseline - actual == sum(savings)` holds by construction. The contract carries floats, so amounts are
rounded to 1e-10 USD and the (at most a few 1e-10) rounding residual is assigned to the largest saving:
the identity then also holds exactly in the rounded figures every consumer sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.schemas import STRATEGIES, CostData, CostEvent, CostPoint, Strategy, UsageRecord

QUANTUM = Decimal("1e-10")
_ROUNDING = Context(prec=80, rounding=ROUND_HALF_EVEN)
_NO_MODEL_SOURCES = frozenset({"cache_exact", "cache_semantic", "coalesced"})


@dataclass(frozen=True)
class PricedChain:
    """Exact amounts of one record, before rounding for the contract."""

    baseline: Decimal
    actual: Decimal
    savings: dict[Strategy, Decimal] = field(default_factory=dict)
    unpriced: tuple[str, ...] = ()  # models the catalog lacks, priced at its most expensive rates


def price_point(point: CostPoint, catalog: PriceCatalog, unpriced: list[str]) -> Decimal:
    """The catalog's price, or for a model it lacks the conservative price (and the model is noted): billed
    usage is always counted, never dead-lettered for want of a rate."""
    if catalog.has(point.model):
        return catalog.price(point)
    if point.model not in unpriced:
        unpriced.append(point.model)
    return catalog.price_conservative(point)


def price_chain(record: UsageRecord, catalog: PriceCatalog) -> PricedChain:
    unpriced: list[str] = []
    previous = baseline = price_point(record.baseline, catalog, unpriced)
    savings: dict[Strategy, Decimal] = {}
    for step in record.steps:
        cost = price_point(step, catalog, unpriced)
        savings[step.strategy] = savings.get(step.strategy, Decimal(0)) + (previous - cost)
        previous = cost
    return PricedChain(baseline=baseline, actual=previous, savings=savings, unpriced=tuple(unpriced))


def _round(value: Decimal) -> Decimal:
    with localcontext(_ROUNDING):
        return value.quantize(QUANTUM)


def round_chain(chain: PricedChain) -> PricedChain:
    """Rounds to 1e-10 USD keeping `baseline - actual == sum(savings)` exact in the rounded values."""
    baseline, actual = _round(chain.baseline), _round(chain.actual)
    savings = {s: _round(v) for s, v in chain.savings.items()}
    residual = (baseline - actual) - sum(savings.values(), Decimal(0))
    if residual and savings:
        # Largest exact saving absorbs the residual; ties broken by the fixed strategy order.
        target = max(savings, key=lambda s: (abs(chain.savings[s]), -STRATEGIES.index(s)))
        savings[target] += residual
    return PricedChain(baseline=baseline, actual=actual, savings=savings, unpriced=chain.unpriced)


def _f(value: Decimal) -> float:
    return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0


def _last_point(record: UsageRecord) -> CostPoint:
    return record.steps[-1] if record.steps else record.baseline


def price_usage(record: UsageRecord, catalog: PriceCatalog) -> CostData:
    """The cost event payload of one usage record. A model the catalog lacks is priced at the catalog's most
    expensive rates and flagged (`price_unknown`, `unpriced_models`), so its spend still reaches the ledger,
    the reports and the budgets."""
    rounded = round_chain(price_chain(record, catalog))
    last = _last_point(record)
    model = record.actual_model
    if model is None and record.source not in _NO_MODEL_SOURCES:
        model = last.model
    points: list[CostPoint] = [record.baseline, *record.steps]
    return CostData(
        usage_id=record.id,
        request_id=record.request_id,
        tenant=record.tenant,
        stage=record.stage,
        task_type=record.task_type,
        tags=dict(record.tags),
        source=record.source,
        model=model,
        baseline_model=record.baseline.model,
        usage=last.usage,
        items=record.items,
        baseline_cost_usd=_f(rounded.baseline),
        actual_cost_usd=_f(rounded.actual),
        saved_usd=_f(rounded.baseline - rounded.actual),
        savings_by_strategy={s: _f(v) for s, v in rounded.savings.items()},
        estimated=last.usage.estimated,
        baseline_estimated=any(p.usage.estimated for p in (points[:-1] or points)),
        batch=last.batch,
        price_unknown=bool(rounded.unpriced),
        unpriced_models=rounded.unpriced,
        catalog_version=catalog.version,
        simulated=record.simulated,
    )


def event_id(usage_id: str) -> str:
    """Deterministic CloudEvents id: a redelivered usage record yields the same id, so consumers dedupe."""
    return hashlib.sha256(usage_id.encode()).hexdigest()[:32]


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cost_event(record: UsageRecord, catalog: PriceCatalog) -> CostEvent:
    return CostEvent(
        id=event_id(record.id),
        subject=record.tenant,
        time=rfc3339(record.occurred_at),
        data=price_usage(record, catalog),
    )
