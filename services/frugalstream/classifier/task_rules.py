"""Transparent task-type rules: an operator can read why a request got its type.

Ordered patterns over the last user turn; the first family with a match wins, `chat` is the fallback.
A producer's explicit `task_hint` always wins over the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from frugalstream.llm.cache_keys import split_conversation
from frugalstream.schemas import LLMRequest, TaskType


@dataclass(frozen=True)
class TaskDecision:
    task_type: TaskType
    rule: str


_PATTERNS: tuple[tuple[TaskType, str, str], ...] = (
        ("code", "code_block", r"```|\bdef \w+\(|\bclass \w+[:(]|#include|\bSELECT\b.+\bFROM\b|=>|\bfunction\s*\("),
        ("code", "code_words", r"\b(python|javascript|typescript|java|rust|golang|c\+\+|sql|regex|bash|function|"
                               r"script|compile|debug|refactor|stack trace|unit test|api endpoint|algorithm)\b"),
        ("summarization", "summarize", r"\b(summari[sz]e|summary|tl;?dr|condense|key points|recap)\b"),
        ("extraction", "extract", r"\b(extract|list all|pull out|parse|find all|which (names|dates|entities))\b"),
        ("classification", "classify", r"\b(classify|categori[sz]e|label|sentiment|is this (spam|positive|negative)|"
                                        r"which category)\b"),
        ("reasoning", "math", r"\b(prove|proof|derive|calculate|compute|solve|how many|probability|equation|"
                              r"integral|theorem)\b|(?<!\d)\d++\s*+[-+*/^]\s*+\d"),
        ("reasoning", "analysis", r"\b(step by step|reason|analy[sz]e|compare .+ and|trade-?offs?|why does|"
                                  r"explain why)\b"),
        ("creative", "creative", r"\b(poem|story|song|lyrics|haiku|joke|fiction|imagine|screenplay|limerick)\b"),
        ("drafting", "draft", r"\b(write|draft|compose|rewrite|email|letter|cover letter|blog post|essay|"
                              r"proposal|announcement|reply to)\b"),
        ("faq", "faq_question", r"^(what|when|where|how|can|do|does|is|are|why|who|which|could|will|i )\b.{0,160}$"),
)
_RULES: tuple[tuple[TaskType, str, re.Pattern[str]], ...] = tuple(
    (task, name, re.compile(pattern, re.IGNORECASE)) for task, name, pattern in _PATTERNS
)
# The rules read at most this much of each end of a long turn. A pattern like `SELECT.+FROM` costs time quadratic
# in what it reads (a turn of "SELECT SELECT ..." near the size limit would hold a stage for minutes), and the
# instruction that types a long turn sits at its start or its end ("Summarize this: <document>"). The `faq` rule
# only matches a turn far shorter than this, so it never matches a window of a longer one.
RULE_WINDOW_CHARS = 4_000


def _windows(text: str) -> tuple[str, ...]:
    if len(text) <= 2 * RULE_WINDOW_CHARS:
        return (text,)
    return text[:RULE_WINDOW_CHARS], text[-RULE_WINDOW_CHARS:]


def classify_task(request: LLMRequest) -> TaskDecision:
    if request.task_hint is not None:
        return TaskDecision(request.task_hint, "task_hint")
    _, earlier, last_user = split_conversation(request.messages)
    text = last_user.strip()
    windows = _windows(text)
    for task, name, pattern in _RULES:
        if any(pattern.search(window) for window in windows):
            # A short question inside a long conversation is a chat turn, not a standalone FAQ.
            if task == "faq" and len(earlier) >= 2:
                return TaskDecision("chat", "faq_in_conversation")
            return TaskDecision(task, name)
    # A short standalone message that asks for no task ("my card hasn't arrived") is support-FAQ traffic.
    if not earlier and len(text) <= 300:
        return TaskDecision("faq", "short_single_turn")
    return TaskDecision("chat", "fallback")
