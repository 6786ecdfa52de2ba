"""Shared heavy dependencies, built once per process and on demand: tests pass fakes through the factories
instead of patching globals. Every service's `wire` takes them; nothing else builds models or providers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from frugalstream.llm import pair_encoder
from frugalstream.llm import verifier as lexical
from frugalstream.llm.embedder import AsyncEmbedder, Embedder, MiniLMEmbedder
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.update import catalog_file
from frugalstream.llm.providers import Provider, build_provider
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.verifier import Verifier
from frugalstream.runtime.settings import Settings


def build_embedder(settings: Settings) -> Embedder:
    """The production embedder at the settings' precision, length and threads."""
    return MiniLMEmbedder(precision=settings.model_precision, max_seq_tokens=settings.embed_max_tokens,
                          threads=settings.model_threads)


def build_verifier(settings: Settings) -> Verifier:
    """The semantic verifier the settings choose (the cross-encoder by default)."""
    if settings.semantic_verifier == "cross_encoder":
        return pair_encoder.CrossEncoderVerifier.load(precision=settings.model_precision,
                                                      threads=settings.model_threads)
    return lexical.TrainedVerifier.load()


@dataclass
class Resources:
    """Shared dependencies. Tests pass fakes through the factories instead of patching globals."""

    settings: Settings
    embedder_factory: Callable[[], Embedder] | None = None
    provider_factory: Callable[[str], Provider] | None = None

    @cached_property
    def counter(self) -> TokenCounter:
        return TokenCounter()

    @cached_property
    def embedder(self) -> AsyncEmbedder:
        factory = self.embedder_factory or (lambda: build_embedder(self.settings))
        return AsyncEmbedder(factory())

    @cached_property
    def verifier(self) -> Verifier:
        return build_verifier(self.settings)

    @cached_property
    def catalog(self) -> PriceCatalog:
        s = self.settings
        return PriceCatalog.load(catalog_file(s.price_catalog, s.state_dir), overrides=s.price_overrides)

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
