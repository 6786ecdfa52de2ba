"""Provider adapters behind one `Provider` protocol, chosen by name from settings."""

from __future__ import annotations

from typing import Any, Literal

from frugalstream.llm.providers.anthropic import AnthropicProvider
from frugalstream.llm.providers.base import (
    Completion,
    ErrorKind,
    Provider,
    ProviderError,
    parse_retry_after,
)
from frugalstream.llm.providers.openai import OpenAIProvider
from frugalstream.llm.providers.simulated import SimulatedProvider

ProviderName = Literal["simulated", "openai", "anthropic"]

__all__ = [
    "AnthropicProvider", "Completion", "ErrorKind", "OpenAIProvider", "Provider", "ProviderError",
    "ProviderName", "SimulatedProvider", "build_provider", "endpoint_for", "parse_retry_after",
]


def endpoint_for(model: str) -> Literal["openai", "anthropic"]:
    """Where a model is sent when a real provider is configured: claude models to Anthropic, every other model
    to the OpenAI-compatible endpoint. One rule for the classifier (which routes) and the gateway (which needs
    the keys of the endpoints it will call)."""
    return "anthropic" if model.startswith("claude") else "openai"


def build_provider(name: ProviderName, **settings: Any) -> Provider:
    """Construct a provider from keyword settings.

    `None` values are dropped so unset optional settings keep the adapter's defaults; unknown keys still
    raise TypeError, so a misspelt setting fails at startup instead of being silently ignored.
    """
    kwargs = {k: v for k, v in settings.items() if v is not None}
    if name == "simulated":
        return SimulatedProvider(**kwargs)
    if name == "openai":
        return OpenAIProvider(**kwargs)
    if name == "anthropic":
        return AnthropicProvider(**kwargs)
    raise ValueError(f"unknown provider {name!r}; expected simulated, openai or anthropic")
