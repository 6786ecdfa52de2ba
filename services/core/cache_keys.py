"""Cache keys: what must match exactly (scope), what identifies a conversation (exact), and what gets embedded.

A scope is a hard wall: tenant (or an opted-in shared scope), system prompt, tools, response format and the
sampling parameters that change the answer. The tier is deliberately NOT in the scope: entries carry the
tier that produced them, so an answer can serve the same or a lower tier but never a higher one.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence

from schemas import TIERS, CacheKeys, ChatMessage, LLMRequest, Tier

_WS = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s.!?;:,]+$")


def clean_text(text: str) -> str:
    """Unicode form and whitespace; case is kept because names and acronyms matter to the verifier."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def normalize_text(text: str) -> str:
    """Case, unicode form, whitespace and trailing punctuation do not change what is being asked."""
    return _TRAILING.sub("", clean_text(text).casefold())


def _digest(payload: object) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _turn(m: ChatMessage) -> list[object]:
    return [m.role, normalize_text(m.content), m.name, [[c.name, c.arguments] for c in m.tool_calls], m.tool_call_id]


def tier_rank(tier: Tier) -> int:
    return TIERS.index(tier)


def split_conversation(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[ChatMessage], str]:
    """(system turns, turns before the last user turn, last user text)."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    last_user = max((i for i, m in enumerate(rest) if m.role == "user"), default=-1)
    if last_user < 0:
        return system, rest, ""
    return system, rest[:last_user], rest[last_user].content


def cache_keys(request: LLMRequest, tier: Tier) -> CacheKeys:
    system, earlier, last_user = split_conversation(request.messages)
    owner = f"shared:{request.cache.shared_scope}" if request.cache.shared_scope else f"tenant:{request.tenant}"
    sampling = request.sampling.model_dump(mode="json")
    scope = _digest({
        "owner": owner,
        "system": [normalize_text(m.content) for m in system],
        "tools": list(request.tools),
        "response_format": request.response_format,
        "sampling": sampling,
        "max_tokens": request.max_tokens,
    })
    prefix = _digest([_turn(m) for m in earlier])
    return CacheKeys(
        scope=scope, prefix=prefix, exact=_digest([scope, prefix, normalize_text(last_user)]),
        lookup_text=clean_text(last_user),
        tier_rank=tier_rank(tier),
    )
