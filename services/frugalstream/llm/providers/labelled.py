"""A simulated provider that answers from labels, so audits, judges and thresholds are testable offline.

Two kinds of labelled traffic:
- a FAQ stream (question -> answer label): every model gives the label's canonical answer, so two questions
  share an answer exactly when they share a label;
- routing outcome data (prompt -> weak model right?, strong model right?): a model in `weak_models` is right or
  wrong as the data says, any other model as the strong one; a right answer is the prompt's correct answer, a
  wrong one is that model's own wrong answer.

A request in the LLM judge's format (`frugalstream.llm.judges.llm_judge_messages`) is graded from the same
labels: ACCEPT when answer A is as good as answer B (FAQ: the same answer; routing: A right or B wrong); one
answer graded alone (`llm_grade_messages`) is ACCEPTed when it is right. Every
answer starts with "[simulated <model>]" like the plain simulated provider's, and is flagged simulated.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from frugalstream.llm.judges import normalize
from frugalstream.llm.providers.base import Completion
from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import ChatMessage, SamplingParams, TokenUsage

_JUDGE = re.compile(r"ANSWER A:\n<<<\n(?P<a>.*?)\n>>>\n\nANSWER B:\n<<<\n(?P<b>.*?)\n>>>", re.S)
_GRADE = re.compile(r"\n\nANSWER:\n<<<\n(?P<a>.*?)\n>>>\n\nGrade", re.S)
_CORRECT = "correct answer"


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _tag(text: str) -> str:
    return hashlib.sha256(_key(text).encode()).hexdigest()[:12]


class LabelledProvider:
    """`faq`: question -> label; `outcomes`: prompt -> (weak right, strong right). Unknown prompts get a
    per-prompt answer (distinct from every label's), so they never look like a known answer."""

    name = "simulated"

    def __init__(self, *, faq: Mapping[str, str] | None = None,
                 outcomes: Mapping[str, tuple[bool, bool]] | None = None,
                 weak_models: Sequence[str] = (), token_counter: TokenCounter | None = None) -> None:
        self._faq = {_key(q): label for q, label in (faq or {}).items()}
        self._outcomes = {_key(p): o for p, o in (outcomes or {}).items()}
        self._weak = frozenset(weak_models)
        self._counter = token_counter or TokenCounter()
        self.calls = 0

    def answer(self, model: str, prompt: str) -> str:
        """The model's answer to `prompt`, without the simulated marker."""
        key = _key(prompt)
        label = self._faq.get(key)
        if label is not None:
            return f"The answer for {label}: see the {label} article in the help centre."
        outcome = self._outcomes.get(key)
        if outcome is not None:
            right = outcome[0] if model in self._weak else outcome[1]
            if right:
                return f"The {_CORRECT} to question {_tag(prompt)}."
            return f"A wrong answer ({'weak' if model in self._weak else 'strong'}) to question {_tag(prompt)}."
        return f"An answer to question {_tag(prompt)}."

    def grade(self, a: str, b: str) -> str:
        """The judge's verdict on A against B, from what the labels make of each answer."""
        if self._outcomes:
            return "ACCEPT" if (_CORRECT in a) or (_CORRECT not in b) else "REJECT"
        return "ACCEPT" if normalize(a) == normalize(b) else "REJECT"

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams,
                       max_tokens: int | None = None, **_options: Any) -> Completion:
        self.calls += 1
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        judged, graded = _JUDGE.search(last), _GRADE.search(last)
        if judged:
            text = self.grade(judged["a"], judged["b"])
        elif graded:  # one answer alone: right when the labels say so (every FAQ answer is its label's)
            text = "ACCEPT" if (_CORRECT in graded["a"] or not self._outcomes) else "REJECT"
        else:
            text = self.answer(model, last)
        content = f"[simulated {model}] {text}"
        usage = TokenUsage(input_tokens=self._counter.count_messages(messages, model),
                           output_tokens=self._counter.count_text(content, model))
        return Completion(content=content, model=model, usage=usage, finish_reason="stop", latency_ms=0.0,
                          simulated=True)

    async def aclose(self) -> None:
        return None
