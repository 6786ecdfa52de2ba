"""Cache keys: what must match exactly (scope), what identifies a conversation (exact), and what gets embedded.

A scope is a hard wall: tenant (or a shared scope the tenant's policy grants), the system prompt as written,
tools and tool choice, response format, the sampling parameters that change the answer, and the pinned model.
The tier is deliberately NOT in the scope: entries carry the tier that produced them, so an answer can serve the same or
a lower tier but never a higher one. A pin is: a pinned request is served only by an answer of the same pin,
and an unpinned request never by a pinned answer.

Every turn is in the key, including the assistant tool calls, tool results and assistant turns after the last
user message: whoever can append a turn must not be able to read (or poison) the answer computed for another
conversation. Only user text is normalized (case, unicode form, whitespace, trailing punctuation: a user
retyping a question still asks it; text laid out in lines, quoted as code or reading as code on one line keeps
its case and layout);
everything else is hashed as written, whitespace-trimmed at most, because "Answer ONLY in French." and "answer
only in french" are different instructions, and a tool result is data. A participant's `name` is in the key.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence

from frugalstream.schemas import TIERS, CacheKeys, ChatMessage, LLMRequest, Tier

#: Characters of the last user turn the keys carry as `lookup_text`: twice what the verifier reads of a text (over
#: that, never a semantic hit), so a long prompt's routed message is not twice its size (past half the message
#: limit it was answered `too_large` after it was accepted). A longer turn is cut and marked `lookup_truncated`.
LOOKUP_TEXT_MAX = 8_192
_WS = re.compile(r"\s+")
# Matched at the start of the REVERSED text: `[...]+$` searched forward retries from every character of a run of
# punctuation that is not at the end ("." * 20_000 + "a" took seconds); anchored on the reversed text it is linear.
_TRAILING_REVERSED = re.compile(r"[\s.!?;:,]*")
# A word of two or more letters ("fine!"): the only thing a "!" right after merely exclaims. After a digit, a
# ")" or a lone letter it is an operator: "Compute 10!", "Simplify (n+1)!", "What is n!".
_PLAIN_WORD = re.compile(r"(?<!\w)[^\W\d_]{2,}$")
# One line that reads as code: a string literal ('abc', "ABC"; an apostrophe inside a word opens none), a call
# (print(, .isupper(, f(x)) or an assignment/comparison. Its case and spacing are what it computes.
_CODE_LIKE = re.compile(r"""(?<!\w)(['"]).*?\1|\w\(|=""")
# Compatibility forms whose NFKC folding changes the meaning: 3² is not 32, H₂O is not H2O, ½ is not 1⁄2.
_MEANINGFUL_FORMS = ("<super>", "<sub>", "<fraction>")


def fold_unicode(text: str) -> str:
    """NFKC (full-width letters, ligatures, odd spaces fold to their plain forms), except the forms that carry
    meaning, which NFKC would turn into other text."""
    text = unicodedata.normalize("NFC", text)
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text  # nothing to fold (a meaningful form is never NFKC-normal): no pass per character
    return unicodedata.normalize("NFC", "".join(
        ch if unicodedata.decomposition(ch).startswith(_MEANINGFUL_FORMS) else unicodedata.normalize("NFKC", ch)
        for ch in text))


def strip_trailing(text: str) -> str:
    """Trailing punctuation and space; "!" right after anything but a plain word is kept (a factorial)."""
    tail = _TRAILING_REVERSED.match(text[::-1])
    cut = len(text) - (tail.end() if tail else 0)
    if cut == len(text):
        return text
    head = text[:cut]
    if text[cut] != "!" or _PLAIN_WORD.search(head):
        return head
    bangs = len(text[cut:]) - len(text[cut:].lstrip("!"))
    return head + "!" * bangs  # the whole run: 5!! (a double factorial, 15) is not 5! (120)


def _laid_out(text: str) -> str | None:
    """Text in lines, quoted as code or reading as code, with its case and layout (identifiers, string literals
    and indentation change what a program does); None for one line of prose."""
    if "\n" in text or "`" in text:
        return "\n".join(line.rstrip() for line in text.splitlines())
    if _CODE_LIKE.search(text):  # one line of code: print('ABC'.isupper())
        return text
    return None


def clean_text(text: str) -> str:
    """Unicode form and whitespace (a layout that matters is kept); case is kept because names and acronyms
    matter to the verifier. The models read it as they would the collapsed text: their tokenizers split on
    whitespace."""
    laid_out = _laid_out(composed := unicodedata.normalize("NFC", text).strip())
    return _WS.sub(" ", fold_unicode(composed)) if laid_out is None else laid_out


def normalize_text(text: str) -> str:
    """Case, unicode form, whitespace and trailing punctuation do not change what is being asked, except in text
    laid out in lines or read as code. Case is lowered, never casefolded: casefolding turns a word into another
    ("Buße", penance, into "busse", buses). Code keeps its compatibility characters too (NFC only): len('ﬁ') is 1,
    len('fi') is 2."""
    laid_out = _laid_out(composed := unicodedata.normalize("NFC", text).strip())
    return strip_trailing(_WS.sub(" ", fold_unicode(composed)).lower()) if laid_out is None else laid_out


def _digest(payload: object) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _turn(m: ChatMessage) -> list[object]:
    """A user's words are normalized; what a system, an assistant or a tool wrote is kept as written."""
    content = normalize_text(m.content) if m.role == "user" else m.content.strip()
    return [m.role, content, m.name, [[c.id, c.name, c.arguments] for c in m.tool_calls], m.tool_call_id]


def tier_rank(tier: Tier) -> int:
    return TIERS.index(tier)


def conversation_parts(
    messages: Sequence[ChatMessage],
) -> tuple[list[ChatMessage], list[ChatMessage], str, list[ChatMessage]]:
    """(system turns, turns before the last user turn, last user text, turns after it)."""
    system = [m for m in messages if m.role == "system"]
    rest = [m for m in messages if m.role != "system"]
    last_user = max((i for i, m in enumerate(rest) if m.role == "user"), default=-1)
    if last_user < 0:
        return system, rest, "", []
    return system, rest[:last_user], rest[last_user].content, rest[last_user + 1:]


def split_conversation(messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], list[ChatMessage], str]:
    """(system turns, turns before the last user turn, last user text): what the task rules look at.

    Not a cache key: turns after the last user turn are left out here; `cache_keys` uses `conversation_parts`.
    """
    system, earlier, last_user, _ = conversation_parts(messages)
    return system, earlier, last_user


def cache_keys(request: LLMRequest, tier: Tier, *, pinned: str | None = None) -> CacheKeys:
    """`pinned` is the model a request is pinned to (route.model when route.pinned), None when unpinned."""
    system, earlier, last_user, after = conversation_parts(request.messages)
    # A participant's `name` reaches the model ("What is my name?"): in the scope and the shard when set.
    system_names = [m.name for m in system]
    last_name = next((m.name for m in reversed(request.messages) if m.role == "user"), None)
    owner = f"shared:{request.cache.shared_scope}" if request.cache.shared_scope else f"tenant:{request.tenant}"
    sampling = request.sampling.model_dump(mode="json")
    scope = _digest({
        "owner": owner,
        "system": [m.content.strip() for m in system],
        "tools": list(request.tools),
        "response_format": request.response_format,
        "sampling": sampling,
        "max_tokens": request.max_tokens,
        "pinned": pinned,
        # Only when set, so the scopes of requests without them (and the cache built from them) stay as they were.
        **({"system_names": system_names} if any(system_names) else {}),
        **({"tool_choice": request.tool_choice} if request.tool_choice is not None else {}),
        **({"parallel_tool_calls": request.parallel_tool_calls} if request.parallel_tool_calls is not None else {}),
    })
    # The shard a semantic lookup searches: every turn but the last user text, on both sides of it.
    prefix = _digest({"before": [_turn(m) for m in earlier], "after": [_turn(m) for m in after],
                      **({"name": last_name} if last_name else {})})
    lookup = clean_text(last_user)
    return CacheKeys(
        scope=scope, prefix=prefix, exact=_digest([scope, prefix, normalize_text(last_user)]),
        lookup_text=lookup[:LOOKUP_TEXT_MAX], tier_rank=tier_rank(tier),
        **({"lookup_truncated": True} if len(lookup) > LOOKUP_TEXT_MAX else {}),
    )
