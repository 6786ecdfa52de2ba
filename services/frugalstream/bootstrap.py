"""The one place that builds services and their dependencies; heavy resources are built once, on demand."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from frugalstream.accountant.app import AccountantService
from frugalstream.accountant.budgets import BudgetsConfig, BudgetTracker
from frugalstream.accountant.ledger import Ledger
from frugalstream.classifier.app import ClassifierService
from frugalstream.classifier.logic import Classifier
from frugalstream.classifier.router import EscalationRouter
from frugalstream.classifier.routing import TierThresholds
from frugalstream.dedupe.app import DedupeService
from frugalstream.dedupe.wiring import build_deduper, build_verifier
from frugalstream.gateway.app import GatewayService
from frugalstream.gateway.completed import TopicCompleted
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.embedder import AsyncEmbedder, Embedder, MiniLMEmbedder
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import Provider, build_provider
from frugalstream.llm.resilience import RetryPolicy
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.verifier import Verifier
from frugalstream.runtime.service import Service
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import TIERS
from frugalstream.summarizer.app import SummarizerService, build_summarizer

SERVICE_NAMES: tuple[str, ...] = ("classifier", "dedupe", "gateway", "summarizer", "accountant")


@dataclass
class Resources:
    """Shared dependencies. Tests pass fakes through the factories instead of patching globals."""

    settings: Settings
    embedder_factory: Callable[[], Embedder] = field(default=lambda: MiniLMEmbedder())
    provider_factory: Callable[[str], Provider] | None = None

    @cached_property
    def counter(self) -> TokenCounter:
        return TokenCounter()

    @cached_property
    def embedder(self) -> AsyncEmbedder:
        return AsyncEmbedder(self.embedder_factory())

    @cached_property
    def verifier(self) -> Verifier:
        return build_verifier(self.settings)

    @cached_property
    def catalog(self) -> PriceCatalog:
        return PriceCatalog.load(overrides=self.settings.price_overrides)

    def provider(self, name: str) -> Provider:
        if self.provider_factory is not None:
            return self.provider_factory(name)
        s = self.settings
        if name == "simulated":
            return build_provider("simulated", latency_scale=s.simulated_latency_scale, token_counter=self.counter)
        if name == "openai":
            return build_provider("openai", base_url=s.openai_base_url,
                                  api_key=s.secret(s.openai_api_key, s.openai_api_key_file),
                                  timeout_s=s.provider_timeout_s, token_counter=self.counter)
        if name == "anthropic":
            return build_provider("anthropic", base_url=s.anthropic_base_url,
                                  api_key=s.secret(s.anthropic_api_key, s.anthropic_api_key_file),
                                  timeout_s=s.provider_timeout_s, token_counter=self.counter)
        raise ValueError(f"unknown provider {name!r}")

    def close(self) -> None:
        if "embedder" in self.__dict__:
            self.embedder.close()


def build_service(name: str, res: Resources) -> Service:
    s = res.settings
    state = s.state_dir
    if name == "classifier":
        thresholds = TierThresholds(mid=s.route_threshold_mid, large=s.route_threshold_large)
        return ClassifierService(s, Classifier(s, res.counter, embedder=res.embedder, scorer=EscalationRouter.load(),
                                               thresholds=thresholds, catalog=res.catalog))
    if name == "dedupe":
        return DedupeService(s, build_deduper(s, res.embedder, res.verifier))
    if name == "gateway":
        names = ("simulated",) if s.provider == "simulated" else ("openai", "anthropic")
        providers = {n: res.provider(n) for n in names}
        policy = RetryPolicy(attempts=s.provider_max_attempts)
        models = {m for tier in TIERS for m in s.tiers.for_tier(tier)}
        model_providers = {} if s.provider == "simulated" else {
            m: res.catalog.provider(m) for m in models if res.catalog.has(m)
        }
        completed = TopicCompleted(s)  # paid calls live on `llm.gateway.completed`, not in the state dir
        return GatewayService(s, Gateway(providers, completed, policy=policy, model_providers=model_providers),
                              store=completed)
    if name == "summarizer":
        return SummarizerService(s, build_summarizer(s, res.provider(s.provider), lambda: res.embedder))
    if name == "accountant":
        tracker = BudgetTracker(BudgetsConfig.from_file(s.budgets_file)) if s.budgets_file else None
        return AccountantService(s, res.catalog, Ledger(state / "ledger.sqlite"), budgets=tracker)
    raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICE_NAMES)}")


def build_services(names: Sequence[str], res: Resources) -> list[Service]:
    unknown = [n for n in names if n not in SERVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}; choose from {', '.join(SERVICE_NAMES)}")
    return [build_service(n, res) for n in names]
