"""The cost and saving of one answer, for the response headers: an estimate at answer time.

Priced like the ledger prices it (the accountant's `llm.cost-events` remain the record): the baseline is the
classifier's baseline model (one rule, `savings_baseline`) on the untrimmed request and the answer's output;
the actual cost is the billed usage of a model call, and nothing for an answer from cache or from a coalesced
twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from frugalstream.llm.pricing.baseline import savings_baseline
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import CostPoint, LLMRequest, LLMResponse, TokenUsage


@dataclass(frozen=True)
class Estimate:
    cost_usd: Decimal
    baseline_usd: Decimal
    baseline_model: str

    @property
    def saving_usd(self) -> Decimal:
        return max(self.baseline_usd - self.cost_usd, Decimal(0))


class Pricer:
    def __init__(self, settings: Settings, catalog: PriceCatalog, counter: TokenCounter) -> None:
        self.settings, self.catalog, self.counter = settings, catalog, counter

    def _price(self, point: CostPoint) -> Decimal:
        return self.catalog.price(point) if self.catalog.has(point.model) else self.catalog.price_conservative(point)

    def baseline_model(self, request: LLMRequest, response: LLMResponse | None = None) -> str:
        """The classifier's baseline (`savings_baseline`). A pin counts as served when the answer's model is the
        pin: a budget that dropped it answered with a routed model. A provider that reports another name for a
        served pin (a dated snapshot) matters only for a pin the catalog cannot price, and then errs towards
        the default baseline: a smaller saving than the ledger's, never a larger one."""
        policy = self.settings.tenants.get(request.tenant, TenantPolicy())
        served = (request.model is not None and response is not None and response.model is not None
                  and response.model.strip().lower() == request.model.strip().lower())
        return savings_baseline(self.catalog, self.settings.default_baseline_model,
                                configured=policy.baseline_model, pinned=request.model, pin_served=served)

    def estimate(self, request: LLMRequest, response: LLMResponse) -> Estimate:
        """Blocking (token counting): call it off the event loop."""
        baseline = self.baseline_model(request, response)
        billed = response.usage if response.source == "llm" and response.usage else None
        output = (billed.output_tokens + billed.reasoning_tokens if billed else
                  self.counter.count_text(response.content or "", baseline))
        full = TokenUsage(input_tokens=self.counter.count_messages(request.messages, baseline), output_tokens=output)
        cost = self._price(CostPoint(model=response.model, usage=billed)) if billed and response.model else Decimal(0)
        return Estimate(cost, self._price(CostPoint(model=baseline, usage=full)), baseline)
