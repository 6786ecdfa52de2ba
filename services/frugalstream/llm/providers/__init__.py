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
    "ProviderName", "SimulatedProvider", "build_provider", "parse_retry_after",
]


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
