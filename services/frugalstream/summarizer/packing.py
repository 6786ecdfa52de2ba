"""Prompts for one item and for a pack of items, the pack parser, and the packer.

Packed format: the reply repeats each item's header line `### <id>` followed by its summary. Headers cost
about four tokens per item, where JSON lines would cost about ten, and output tokens are the dear ones.
The parser checks every item on its own (known id, not repeated, not empty, not over its budget); an item
that fails is retried alone, so one bad section never costs the rest of the pack.

An item's text is data, never format: in a packed prompt every line of it whose first visible character is `#`
(whatever invisible characters stand before it) gets a backslash before it (`\\### 2`), so no line of one item
reads as another item's header, to the parser or to a model answering one section per header it sees. Otherwise a
text holding the line `### 2` would open a fake section 2, and a model answering each id once could give the real
item 2 that text's summary. In the reply, a header naming no item of the pack spoils the section it cuts short:
that item is retried alone (single prompt, never parsed) instead of kept truncated.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from frugalstream.schemas import ChatMessage

SINGLE_SYSTEM = "You summarize items for a catalog. Follow the instruction exactly and answer with the summary only."
PACKED_SYSTEM = (
    "You summarize several items in one reply. Each item starts with a header line `### <id>`. "
    "Apply the instruction to every item independently. Reply with one section per item, in the same order: "
    "the item's header line `### <id>`, then its summary. Keep each summary under {limit} tokens. "
    "Write nothing else."
)
_HEADER = re.compile(r"^###[ \t]+(\S+)[ \t]*$", re.MULTILINE)
# `#` and the forms of it that NFKC folds to `#` (full-width, small).
_HASHES = frozenset("#\uff03\ufe5f")
# What a reader (or a model that drops them in tokenizing) does not see before a line's first visible character:
# format characters (zero-width space, word joiner, BOM, soft hyphen, bidi marks), marks with nothing to sit on,
# other controls, unassigned and private-use code points, and letters that render blank (Hangul fillers, braille).
_UNSEEN_CATEGORIES = frozenset({"Cf", "Mn", "Me", "Cc", "Cn", "Co"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
# Pack framing beyond the items themselves: the system prompt, the instruction, chat framing.
PACK_OUTPUT_SLACK = 16
HEADER_TOKENS = 6  # "### 12\n" plus the blank line between items


def single_messages(instruction: str, text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage(role="system", content=SINGLE_SYSTEM),
            ChatMessage(role="user", content=f"{instruction}\n\n{text}"))


def _lines(text: str) -> str:
    """Every line break a reader may see (\\r, \\v, U+2028, ...) as `\\n`, so `^` in the patterns finds every line."""
    return "\n".join(text.splitlines())


def _inert_line(line: str) -> str:
    """The line with a backslash before its `#` when `#` is its first visible character: `\\u200b### 2` is
    `### 2` to a reader, so invisible characters in front of it must not keep it from being escaped."""
    for i, char in enumerate(line):
        if char in _HASHES:
            return f"{line[:i]}\\{line[i:]}"
        if not (char.isspace() or char in _BLANK_LETTERS or unicodedata.category(char) in _UNSEEN_CATEGORIES):
            return line
    return line


def inert(text: str) -> str:
    """An item's text as it goes into a packed prompt: no line of it can be taken for a header."""
    return "\n".join(_inert_line(line) for line in _lines(text.strip()).split("\n"))


def packed_messages(instruction: str, items: Sequence[tuple[str, str]], limit: int) -> tuple[ChatMessage, ...]:
    """`items` are (local id, text); local ids are short ("1".."20") so headers stay cheap. Only the headers
    written here start a line with `#` (see the module docstring)."""
    body = "\n\n".join(f"### {local}\n{inert(text)}" for local, text in items)
    return (ChatMessage(role="system", content=PACKED_SYSTEM.format(limit=limit)),
            ChatMessage(role="user", content=f"{instruction}\n\n{body}"))


def call_messages(instruction: str, texts: Sequence[str],
                  max_output_tokens: int) -> tuple[tuple[ChatMessage, ...], int]:
    """The prompt and output budget of one call: the single prompt for one item, the packed one for several."""
    if len(texts) == 1:
        return single_messages(instruction, texts[0]), max_output_tokens
    items = [(str(i + 1), text) for i, text in enumerate(texts)]
    budget = len(texts) * (max_output_tokens + HEADER_TOKENS) + PACK_OUTPUT_SLACK
    return packed_messages(instruction, items, max_output_tokens), budget


@dataclass(frozen=True)
class Parsed:
    good: dict[str, str]
    bad: dict[str, str]  # local id -> why it is rejected


def parse_packed(content: str, expected: Sequence[str], *, max_chars: int, truncated: bool) -> Parsed:
    """Sections by header; an item is good only if it appears once, non-empty, within `max_chars`, and not cut
    short by a header naming no item of the pack (`stray_header`: the rest of its summary went elsewhere).

    When the reply was cut by max_tokens (`truncated`), the last section may be incomplete: rejected.
    """
    content = _lines(content)
    known = set(expected)
    marks = list(_HEADER.finditer(content))
    sections: dict[str, list[str]] = {}
    stray: set[str] = set()
    for n, mark in enumerate(marks):
        end = marks[n + 1].start() if n + 1 < len(marks) else len(content)
        sections.setdefault(mark.group(1), []).append(content[mark.end():end].strip())
        if n + 1 < len(marks) and marks[n + 1].group(1) not in known:
            stray.add(mark.group(1))
    last = marks[-1].group(1) if marks else None
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    for local in expected:
        found = sections.get(local)
        if not found:
            bad[local] = "missing"
        elif len(found) > 1:
            bad[local] = "repeated"
        elif local in stray:
            bad[local] = "stray_header"
        elif not found[0]:
            bad[local] = "empty"
        elif len(found[0]) > max_chars:
            bad[local] = "too_long"
        elif truncated and local == last:
            bad[local] = "truncated"
        else:
            good[local] = found[0]
    return Parsed(good, bad)


def pack(sizes: Sequence[tuple[str, int]], *, max_tokens: int, max_items: int) -> list[list[str]]:
    """Greedy first-fit-decreasing bins of (key, input tokens) within the budget; order inside a bin is stable.

    First-fit-decreasing gets within 11/9 of the optimum number of calls; an item larger than the budget
    gets a pack of its own (it is sent alone, with the single prompt).
    """
    order = {key: i for i, (key, _) in enumerate(sizes)}
    bins: list[tuple[int, list[str]]] = []
    for key, size in sorted(sizes, key=lambda kv: (-kv[1], order[kv[0]])):
        for n, (used, keys) in enumerate(bins):
            if used + size <= max_tokens and len(keys) < max_items:
                bins[n] = (used + size, [*keys, key])
                break
        else:
            bins.append((size, [key]))
    packs = [sorted(keys, key=order.__getitem__) for _, keys in bins]
    return sorted(packs, key=lambda keys: order[keys[0]])
