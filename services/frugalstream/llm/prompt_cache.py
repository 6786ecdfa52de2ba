"""Provider prompt caching, placed for the caller: where cache breakpoints go, and what a cache hit saved.

Providers bill a repeated long prefix (tools, system prompt, leading turns) at a fraction of the input price,
but only when the request is laid out for it. OpenAI caches every prefix of 1,024 tokens or more by itself
(`usage.prompt_tokens_details.cached_tokens` says how much was read); Anthropic caches only up to explicit
`cache_control` breakpoints, and a cache *write* costs a premium (1.25x input) that pays back only if the
prefix is read again within the cache lifetime (5 minutes, refreshed by every read).

So breakpoints are placed only on prefixes that have already been seen within that lifetime (`PrefixTracker`):
a one-off system prompt never pays the write premium, a repeated one is written on its second use and read from
its third. `CachePlan` names the breakpoints in provider-neutral terms (after the tools, after the system
prompt, after the leading turns); each adapter spells them (`anthropic.build_messages_body`). The layout part
is `canonical_tools`: the same tools in another key order would be another prefix, so they are sent canonical.

`uncached` is the counterfactual of the `prompt_cache` strategy in a usage chain (`frugalstream.llm.usage`):
the same tokens billed as plain input. The step's saving is negative when a write did not pay back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import ChatMessage, TokenUsage
from frugalstream.schemas.requests import INSTRUCTION_ROLES

Breakpoint = Literal["tools", "system", "leading"]
BREAKPOINTS: tuple[Breakpoint, ...] = ("tools", "system", "leading")


@dataclass(frozen=True)
class CachePlan:
    """Explicit cache breakpoints, in prefix order: after the tools, after the system prompt (every instruction
    turn, as Anthropic lifts them into `system`), after the leading turns (all but the last turn)."""

    breakpoints: tuple[Breakpoint, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.breakpoints)


def canonical(value: Any) -> Any:
    """Dict keys sorted at every depth: equal content, equal bytes, equal prefix."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def canonical_tools(tools: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], ...]:
    return tuple(canonical(t) for t in tools)


def prefix_units(messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]
                 ) -> dict[Breakpoint, tuple[str, list[ChatMessage]]]:
    """Each breakpoint's prefix: (tools JSON, the messages it covers), cumulative in the order providers read
    them (tools, then system, then turns). `leading` is absent when there is no earlier turn to cache."""
    tools_json = json.dumps(canonical_tools(tools), separators=(",", ":")) if tools else ""
    system = [m for m in messages if m.role in INSTRUCTION_ROLES]
    turns = [m for m in messages if m.role not in INSTRUCTION_ROLES]
    out: dict[Breakpoint, tuple[str, list[ChatMessage]]] = {}
    if tools_json:
        out["tools"] = (tools_json, [])
    if system:
        out["system"] = (tools_json, system)
    if len(turns) > 1:
        out["leading"] = (tools_json, system + turns[:-1])
    return out


def prefix_digest(model: str, tools_json: str, messages: Sequence[ChatMessage]) -> str:
    payload = json.dumps([model, tools_json, [m.model_dump(mode="json") for m in messages]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def prefix_tokens(counter: TokenCounter, model: str, tools_json: str, messages: Sequence[ChatMessage]) -> int:
    return (counter.count_text(tools_json, model) if tools_json else 0) + (
        counter.count_messages(messages, model) if messages else 0)


class PrefixTracker:
    """Prefixes seen within the cache lifetime, bounded (oldest forgotten first). A hit refreshes the lifetime,
    as a provider cache read does."""

    def __init__(self, ttl_s: float = 300.0, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, digest: str) -> bool:
        """Whether `digest` was seen within the lifetime; either way it is (re)noted as seen now."""
        now = self._clock()
        last = self._seen.pop(digest, None)
        self._seen[digest] = now
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return last is not None and now - last <= self.ttl_s

    def peek(self, digest: str) -> bool:
        last = self._seen.get(digest)
        return last is not None and self._clock() - last <= self.ttl_s


class PromptCachePlanner:
    """Breakpoints for providers that need them, on the prefixes (of at least `min_tokens`) that repeat.

    Keyed by tenant as well as content: whether a breakpoint is placed depends only on the tenant's own
    traffic, so one tenant's requests never change how another's are billed.
    """

    def __init__(self, counter: TokenCounter, *, min_tokens: int = 1024, ttl_s: float = 300.0,
                 tracker: PrefixTracker | None = None) -> None:
        self.counter = counter
        self.min_tokens = min_tokens
        self.tracker = tracker or PrefixTracker(ttl_s)

    def plan(self, tenant: str, model: str, messages: Sequence[ChatMessage],
             tools: Sequence[Mapping[str, Any]] = ()) -> CachePlan:
        chosen: list[Breakpoint] = []
        for name, (tools_json, covered) in prefix_units(messages, tools).items():
            if prefix_tokens(self.counter, model, tools_json, covered) < self.min_tokens:
                continue
            if self.tracker.seen(prefix_digest(f"{tenant}\x00{model}", tools_json, covered)):
                chosen.append(name)
        return CachePlan(tuple(chosen))


def uncached(usage: TokenUsage) -> TokenUsage:
    """The same tokens with no prompt cache: cached reads and cache writes billed as plain input."""
    return usage.model_copy(update={
        "input_tokens": usage.input_tokens + usage.cached_input_tokens + usage.cache_write_tokens,
        "cached_input_tokens": 0, "cache_write_tokens": 0})


def used_cache(usage: TokenUsage) -> bool:
    return bool(usage.cached_input_tokens or usage.cache_write_tokens)
