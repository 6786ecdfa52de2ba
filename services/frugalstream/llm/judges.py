"""Judges: is the cheaper answer (`candidate`) acceptable where the counterfactual (`reference`) was given?

Chosen per task type (`audit_judges`): `match` (normalized text, or canonical JSON when both parse) for
deterministic outputs such as labels and extracted JSON; `embedding` (cosine of the two answers' MiniLM
embeddings against `audit_embedding_accept`) for free text; `llm` (a model with a rubric, run by the gateway
as an accounted audit call: `llm_judge_messages` builds its prompt and `parse_llm_verdict` reads it); and
people (`frugalstream audit review`). Judges see answers only through these functions, never a request's
identity, so one tenant's audit cannot inform another's verdict.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from frugalstream.llm.embedder import AsyncEmbedder
from frugalstream.schemas import ChatMessage
from frugalstream.schemas.audits import Verdict

_SIMULATED = re.compile(r"^\s*\[simulated [^\]]*\]\s*")
# Punctuation that is noise in a label (sentence marks, quotes, brackets, markdown); signs, comparisons and
# units are kept: "-1" is not "1", "x > 5" not "x < 5", "C++" not "C", "10%" not "10".
_PUNCT = re.compile(r"[^\w\s+\-−<>=≤≥≠±#%&@/\\^|~$€£¥₹]")
_LONE_DASH = re.compile(r"(?<!\S)[-−]+(?!\S)")  # a bullet or a separator, not a sign
_SPACE = re.compile(r"\s+")
_FENCE = re.compile(r"<{3,}|>{3,}")
_VERDICT = re.compile(r"\b(ACCEPT|REJECT)\b")

DEFAULT_RUBRIC = (
    "You compare two answers to the same request. ANSWER A comes from a cheaper path, ANSWER B from the "
    "reference model. Reply ACCEPT if a user would be as well served by A as by B (same facts, same decision, "
    "nothing important missing or wrong), otherwise REJECT. Reply with one word."
)


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    similarity: float | None = None


class Judge(Protocol):
    name: str

    async def judge(self, pairs: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        """(question, candidate, reference) -> one judgement each."""
        ...


def normalize(text: str) -> str:
    """Case, accents' composition, sentence punctuation and spacing do not change a label (signs and symbols do);
    a simulated marker neither."""
    text = _SIMULATED.sub("", unicodedata.normalize("NFKC", text))
    parsed = _json(text)
    if parsed is not None:
        return json.dumps(parsed, sort_keys=True, separators=(",", ":"))
    return _SPACE.sub(" ", _LONE_DASH.sub(" ", _PUNCT.sub(" ", text.casefold()))).strip()


def _json(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def match(candidate: str, reference: str) -> Verdict:
    return "accept" if normalize(candidate) == normalize(reference) else "reject"


class MatchJudge:
    name = "match"

    async def judge(self, pairs: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        return [Judgement(match(c, r), 1.0 if match(c, r) == "accept" else 0.0) for _, c, r in pairs]


class EmbeddingJudge:
    """Accepts when the two answers' embeddings have cosine >= `accept` (embedded on the embedder's thread)."""

    name = "embedding"

    def __init__(self, embedder: AsyncEmbedder, accept: float) -> None:
        self._embedder = embedder
        self.accept = accept

    async def judge(self, pairs: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        if not pairs:
            return []
        texts = [_SIMULATED.sub("", t) for _, c, r in pairs for t in (c, r)]
        vectors = await self._embedder.embed(texts)
        out: list[Judgement] = []
        for i in range(len(pairs)):
            a, b = vectors[2 * i], vectors[2 * i + 1]
            norm = float(np.linalg.norm(a) * np.linalg.norm(b)) or 1.0
            cos = float(np.dot(a, b)) / norm
            out.append(Judgement("accept" if cos >= self.accept else "reject", round(cos, 4)))
        return out


def fenced(text: str) -> str:
    """`text` to go between the prompt's `<<<` and `>>>` fences: a run of three brackets is spaced out, so the
    text (a tenant steers what its answers say) can neither close its fence nor forge the other answer's."""
    return _FENCE.sub(lambda m: " ".join(m.group()), text)


def llm_judge_messages(question: str, candidate: str, reference: str, rubric: str = DEFAULT_RUBRIC,
                       ) -> tuple[ChatMessage, ...]:
    """The LLM judge's prompt; the answers are fenced (`fenced`) so an answer cannot pose as the instructions."""
    body = (f"REQUEST:\n<<<\n{fenced(question)}\n>>>\n\nANSWER A:\n<<<\n{fenced(candidate)}\n>>>\n\n"
            f"ANSWER B:\n<<<\n{fenced(reference)}\n>>>\n\nVerdict (ACCEPT or REJECT):")
    return (ChatMessage(role="system", content=rubric), ChatMessage(role="user", content=body))


GRADE_RUBRIC = (
    "You grade one answer to a request. Reply ACCEPT if it is correct and serves the user (right facts, right "
    "decision, nothing important missing), otherwise REJECT. Reply with one word."
)


def llm_grade_messages(question: str, answer: str, rubric: str = GRADE_RUBRIC) -> tuple[ChatMessage, ...]:
    """The judge's prompt for one answer alone: quality retained needs to know when the baseline was wrong too."""
    body = f"REQUEST:\n<<<\n{fenced(question)}\n>>>\n\nANSWER:\n<<<\n{fenced(answer)}\n>>>\n\nGrade (ACCEPT or REJECT):"
    return (ChatMessage(role="system", content=rubric), ChatMessage(role="user", content=body))


def parse_llm_verdict(text: str) -> Verdict | None:
    """The verdict word (ACCEPT or REJECT) of the judge's reply; None when it gave neither, or both (a judge quoting
    an answer that pleads ACCEPT before giving its own REJECT has given no verdict the first word can stand for)."""
    found = set(_VERDICT.findall(_SIMULATED.sub("", text).upper()))
    if len(found) != 1:
        return None
    return "accept" if found == {"ACCEPT"} else "reject"
