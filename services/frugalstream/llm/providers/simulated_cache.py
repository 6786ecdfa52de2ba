"""The simulated provider's prompt cache: what a real provider would bill as cached input or cache writes.

Two behaviours, as the providers have them:
- automatic (OpenAI): any prefix of whole turns (after the tools) of at least `min_tokens` that was sent
  within the lifetime is read from cache, rounded down to `increment` tokens; nothing is charged for writing;
- explicit (Anthropic, when the request carries a `CachePlan`): only prefixes ending at a breakpoint are
  cached; the longest one already cached is read, and the part up to the last breakpoint beyond it is written
  (billed at the cache-write rate).

Prefixes are per model (a provider's cache is), not per tenant: a provider cache is shared by everything sent
with one API key, which is what the simulation reproduces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from frugalstream.llm.prompt_cache import (
    CachePlan,
    PrefixTracker,
    canonical_tools,
    prefix_digest,
    prefix_tokens,
    prefix_units,
)
from frugalstream.llm.tokens import TOKENS_REPLY_PRIMER, TokenCounter
from frugalstream.schemas import ChatMessage


@dataclass(frozen=True)
class CacheBill:
    cached: int = 0  # tokens read from the cache
    written: int = 0  # tokens written to it (explicit caching only)


class SimulatedPromptCache:
    def __init__(self, counter: TokenCounter, *, min_tokens: int = 1024, increment: int = 128,
                 ttl_s: float = 600.0, max_entries: int = 50_000, clock: Callable[[], float] | None = None) -> None:
        self.counter = counter
        self.min_tokens = min_tokens
        self.increment = increment
        self.tracker = PrefixTracker(ttl_s, max_entries, clock) if clock else PrefixTracker(ttl_s, max_entries)

    def bill(self, model: str, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]],
             input_tokens: int, plan: CachePlan | None) -> CacheBill:
        bill = self._explicit(model, messages, tools, plan) if plan else self._automatic(model, messages, tools)
        cached = min(bill.cached, input_tokens)
        return CacheBill(cached, min(bill.written, input_tokens - cached))

    def _automatic(self, model: str, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]) -> CacheBill:
        tools_json = json.dumps(canonical_tools(tools), separators=(",", ":")) if tools else ""
        # One pass, each turn counted and hashed once (a 30-turn history must not cost 30 prefix encodings).
        tokens = TOKENS_REPLY_PRIMER + (self.counter.count_text(tools_json, model) if tools_json else 0)
        digest = hashlib.sha256(json.dumps([model, tools_json]).encode())
        best = 0
        for message in messages[:-1]:  # never the whole prompt: the last turn is what is new
            tokens += self.counter.count_message(message, model)
            digest.update(message.model_dump_json().encode())
            if tokens >= self.min_tokens and self.tracker.seen(digest.hexdigest()):
                best = tokens
        return CacheBill(cached=best // self.increment * self.increment)

    def _explicit(self, model: str, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]],
                  plan: CachePlan) -> CacheBill:
        units = prefix_units(messages, tools)
        read = written = 0
        for name in plan.breakpoints:
            if name not in units:
                continue
            tools_json, covered = units[name]
            tokens = prefix_tokens(self.counter, model, tools_json, covered)
            if tokens < self.min_tokens:
                continue  # below the provider's minimum a breakpoint caches nothing
            if self.tracker.seen(prefix_digest(f"explicit\x00{model}", tools_json, covered)):
                read, written = tokens, 0
            else:
                written = tokens - read
        return CacheBill(cached=read, written=written)
