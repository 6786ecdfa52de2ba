"""Semantic-match verifier for the dedupe cache.

Embedding cosine alone serves look-alike questions with a different meaning (PAWS: most word-swapped
non-paraphrases score above 0.95), and a false hit is the worst error the product can make. So a
semantic candidate is served only if (1) no hard rule vetoes it (different numbers, negation, shared
content words or named entities in another order, two words trading roles) and (2) a small trained
model over order-sensitive lexical features plus the cosine scores it above a threshold. Anything in the
grey zone is a miss.

Inference is numpy only: the model is a tiny MLP whose weights ship in ``verifier_model.npz``. This is
the ``features`` verifier (microseconds a pair); the default ``cross_encoder`` verifier
(``pair_encoder.py``) keeps the same rules in front of a fine-tuned cross-encoder.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from frugalstream.llm.cache_keys import fold_unicode
from frugalstream.llm.cache_keys import normalize_text as key_text

# Chosen by scripts/train_verifier.py on the QQP "val" bucket (part of the train split; never QQP dev or
# PAWS): highest recall at precision >= 0.90 there.
DEFAULT_RECALL_COSINE = 0.85
DEFAULT_VERIFY_THRESHOLD = 0.88
ARTIFACT_PATH = Path(__file__).with_name("verifier_model.npz")

# The pair features read at most this many words of each text: the LCS (n*m), the order counts (every pair of
# shared words) and the role swaps are quadratic, and one 2,500-word question against a stored look-alike held
# dedupe's semantic thread for seconds. The cross-encoder reads no more either (MAX_PAIR_TOKENS). A text over the
# cap is vetoed ("too_long"): the rules cannot vouch for what they did not read, and a false hit is the worst error.
MAX_FEATURE_TOKENS = 128
_MAX_FEATURE_CHARS = 32 * MAX_FEATURE_TOKENS  # and of characters (the trigrams), for texts of very long words

_WORDS_NUM = "zero one two three four five six seven eight nine ten eleven twelve"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_TRAILING_PUNCT = " \t\n.?!;:,。？！"
_TOKEN_RE = re.compile(r"\d+(?:[.,:]\d+)*|\w+(?:'\w+)?")
_NUMBER_RE = re.compile(r"^\d+(?:[.,:]\d+)*$")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_WORDS_NUM.split())}
_NEGATIONS = _words(
    """
    not no never nor neither cannot cant dont doesnt didnt isnt arent wasnt werent wont wouldnt shouldnt
    couldnt havent hasnt hadnt
    """
)
_SYMMETRIC = frozenset(["and", "or", "vs", "versus", "nor", "&", "between"])
_STOPWORDS = _words(
    """
    a an the of to in on at by for with from into onto about as is are was were be been being am do does
    did doing have has had having i me my we our you your he him his she her it its they them their this
    that these those there here and or but if so than then too very can could would should will shall
    may might must just also any some such what which who whom whose when where why how whats hows whos
    s t get got
    """
)
_WH = _words("what why how when where who which whom whose is are can do does should")


def normalize_text(text: str) -> str:
    """Canonical form for the verifier's tokens.

    Compatibility characters (full-width letters, ligatures; not super- and subscripts), case and runs of
    whitespace never change an answer, and neither does trailing punctuation (but "10!" is a factorial).
    """
    text = " ".join(fold_unicode(text).lower().split())
    stripped = text.rstrip(_TRAILING_PUNCT)
    if text[len(stripped):].startswith("!") and stripped[-1:].isdigit():
        return stripped + "!"
    return stripped


def _tokens(text: str) -> list[str]:
    toks = _TOKEN_RE.findall(normalize_text(text).replace("n't", " not").replace("’", "'"))
    return [_NUMBER_WORDS.get(t, t) for t in toks]


def _stem(tok: str) -> str:
    """A crude suffix stripper: enough to match "flight"/"flights" without a dictionary."""
    if tok.endswith("'s"):
        tok = tok[:-2]
    for suf in ("ing", "ies", "es", "ed", "s"):
        if len(tok) > len(suf) + 3 and tok.endswith(suf) and not tok.endswith("ss"):
            return tok[: -len(suf)]
    return tok


def _numbers(toks: list[str]) -> list[str]:
    return sorted(t.replace(",", "") for t in toks if _NUMBER_RE.match(t))


def _negated(toks: list[str]) -> bool:
    return sum(t.replace("'", "") in _NEGATIONS for t in toks) % 2 == 1


def _content(toks: list[str]) -> list[str]:
    return [_stem(t) for t in toks if t not in _STOPWORDS and t.replace("'", "") not in _NEGATIONS]


def _jaccard(a: AbstractSet[object], b: AbstractSet[object]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _positions_in(ca: list[str], cb: list[str]) -> list[int]:
    """Where each shared word of ``ca`` (first occurrences, in ``ca``'s order) first appears in ``cb``."""
    pos_b = {w: i for i, w in reversed(list(enumerate(cb)))}
    return [pos_b[w] for w in dict.fromkeys(ca) if w in pos_b]


def _order_stats(ca: list[str], cb: list[str]) -> tuple[float, float, int]:
    """Order agreement of the shared content words: (concordant share, context agreement, discordant).

    A word swap ("from Paris to London" / "from London to Paris") keeps the bag of words but breaks
    the relative order and the word each shared term follows, which is what these two numbers see.
    """
    seq = _positions_in(ca, cb)
    pairs = disc = 0
    for i in range(len(seq)):
        for j in range(i + 1, len(seq)):
            pairs += 1
            disc += seq[i] > seq[j]
    left_a = {w: (ca[i - 1] if i else "^") for i, w in reversed(list(enumerate(ca)))}
    left_b = {w: (cb[i - 1] if i else "^") for i, w in reversed(list(enumerate(cb)))}
    shared = [w for w in left_a if w in left_b]
    ctx = sum(left_a[w] == left_b[w] for w in shared) / len(shared) if shared else 1.0
    return (1.0 - disc / pairs if pairs else 1.0), ctx, disc


def _one_block_moved(ca: list[str], cb: list[str]) -> bool:
    """The shared content words keep their order except that one block moved to the other end.

    "Which currencies do you accept for adding money?" / "For adding money, which currencies do you
    accept?" fronts a clause; every word keeps its neighbours. A swap of two words or roles never reads
    as one rotation of three or more words.
    """
    seq = _positions_in(ca, cb)
    descents = sum(x > y for x, y in pairwise(seq))
    return len(seq) >= 3 and descents == 1 and seq[-1] < seq[0]


def _role_swaps(ta: list[str], tb: list[str]) -> int:
    """Pairs of shared content words that traded their neighbours: "from X to Y" / "from Y to X".

    Coordinations ("X and Y", "between X and Y", "X vs Y") are symmetric and never count.
    """

    def ctx(toks: list[str], d: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, t in enumerate(toks):
            j = i + d
            out.setdefault(t, toks[j] if 0 <= j < len(toks) else "^$"[d > 0])
        return out

    in_b = set(tb)
    shared = [w for w in dict.fromkeys(ta) if w in in_b and w not in _STOPWORDS]
    swaps = 0
    for d in (-1, 1):
        ca, cb = ctx(ta, d), ctx(tb, d)
        for i, w1 in enumerate(shared):
            for w2 in shared[i + 1 :]:
                roles = {ca[w1], ca[w2]}
                if (
                    ca[w1] != ca[w2]
                    and ca[w1] == cb[w2]
                    and ca[w2] == cb[w1]
                    and not roles & _SYMMETRIC
                    and not roles & {w1, w2}
                ):
                    swaps += 1
    return swaps


def _entities(text: str) -> list[str]:
    """Capitalised words not at the start of the text: a cheap proxy for named entities."""
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text))
    return [w.lower() for w in words[1:] if w[:1].isupper()]


def same_question(query: str, candidate: str) -> bool:
    """The same text as the exact cache key reads it: served without asking a model."""
    return key_text(query) == key_text(candidate)


def slot_conflict(query: str, candidate: str) -> str:
    """Why `candidate`'s answer cannot be `query`'s whatever their meanings' likeness ("" when none): a hard rule
    of `pair_features` (numbers, negation, order), or a name in the query the candidate never mentions ("Is
    Mallory an admin?" is not answered by "Is Alice an admin?"). For paths that serve without the pair model."""
    reason = pair_features(query, candidate, 0.0)[1]
    if reason:
        return reason
    return "entity_mismatch" if names(query) - mentioned(candidate) else ""


# The lookbehind starts a match only at the first mark of a run: without it a run of "!" not followed by a space
# is retried from every one of its marks (quadratic). Same splits: a run ends a sentence iff a space follows it.
_SENTENCE = re.compile(r"(?<![.!?])[.!?]+\s+|\n")
# Words titles and sentences capitalise without naming anything ("Can", "What", "Chair With Arms For The Office").
_FUNCTION_WORDS = _STOPWORDS | _WH | _words("over under nor yet all each every both only")


def names(text: str) -> frozenset[str]:
    """Capitalised words that open no sentence or line and are no function word, casefolded: a cheap proxy for
    the slot values (places, currencies, brands, people) that change an answer."""
    found: set[str] = set()
    for sentence in _SENTENCE.split(fold_unicode(text)):
        found.update(w.casefold() for w in re.findall(r"\w+", sentence)[1:] if w[:1].isupper())
    return frozenset(found - _FUNCTION_WORDS)


def mentioned(text: str) -> frozenset[str]:
    """Every word of `text`, casefolded: whether a name occurs at all, in any case."""
    return frozenset(w.casefold() for w in re.findall(r"\w+", fold_unicode(text)))


def _first_wh(toks: list[str]) -> str:
    return next((t for t in toks[:4] if t in _WH), "")


FEATURE_NAMES = (
    "cosine",
    "cos_hi",
    "tok_jacc",
    "content_jacc",
    "contain_min",
    "contain_max",
    "bigram_jacc",
    "content_bigram_jacc",
    "lcs_max",
    "lcs_min",
    "concordance",
    "context_agree",
    "discordant",
    "unmatched_content",
    "len_diff",
    "log_len_min",
    "char3_jacc",
    "entity_jacc",
    "entity_order",
    "wh_mismatch",
    "numbers_present",
    "numbers_one_side",
    "same_bag_reordered",
    "role_swaps",
)


def pair_features(query: str, candidate: str, cosine: float) -> tuple[list[float], str]:
    """Feature vector for one pair, plus the name of a hard rule that vetoes it ("" when none).

    Reads the first MAX_FEATURE_TOKENS words (_MAX_FEATURE_CHARS characters) of each text; a longer text is
    vetoed ("too_long")."""
    ta, tb = _tokens(query), _tokens(candidate)
    na, nb = normalize_text(query), normalize_text(candidate)
    too_long = max(len(ta), len(tb)) > MAX_FEATURE_TOKENS or max(len(na), len(nb)) > _MAX_FEATURE_CHARS
    ta, tb = ta[:MAX_FEATURE_TOKENS], tb[:MAX_FEATURE_TOKENS]
    ca, cb = _content(ta), _content(tb)
    sa, sb = set(ca), set(cb)
    inter = len(sa & sb)
    big_a, big_b = set(pairwise(ta)), set(pairwise(tb))
    cbig_a, cbig_b = set(pairwise(ca)), set(pairwise(cb))
    lcs = _lcs(ta, tb)
    conc, ctx, disc = _order_stats(ca, cb)
    ha, hb = na[:_MAX_FEATURE_CHARS], nb[:_MAX_FEATURE_CHARS]
    ch_a = {ha[i : i + 3] for i in range(max(len(ha) - 2, 1))}
    ch_b = {hb[i : i + 3] for i in range(max(len(hb) - 2, 1))}
    ea, eb = _entities(query)[:MAX_FEATURE_TOKENS], _entities(candidate)[:MAX_FEATURE_TOKENS]
    e_conc, _, e_disc = _order_stats(ea, eb)
    same_bag = sorted(ca) == sorted(cb) and ca != cb
    nums_a, nums_b = _numbers(ta), _numbers(tb)
    swaps = _role_swaps(ta, tb)
    la, lb = max(len(ta), 1), max(len(tb), 1)
    feats = [
        cosine,
        max(cosine - 0.9, 0.0) * 10.0,
        _jaccard(set(ta), set(tb)),
        _jaccard(sa, sb),
        inter / max(min(len(sa), len(sb)), 1),
        inter / max(max(len(sa), len(sb)), 1),
        _jaccard(big_a, big_b),
        _jaccard(cbig_a, cbig_b),
        lcs / max(la, lb),
        lcs / min(la, lb),
        conc,
        ctx,
        min(disc, 5) / 5.0,
        min(len(sa ^ sb), 10) / 10.0,
        abs(la - lb) / max(la, lb),
        float(np.log1p(min(la, lb))),
        _jaccard(ch_a, ch_b),
        _jaccard(set(ea), set(eb)),
        e_conc,
        float(_first_wh(ta) != _first_wh(tb)),
        float(bool(nums_a or nums_b)),
        float(bool(nums_a) != bool(nums_b)),
        float(same_bag),
        min(swaps, 3) / 3.0,
    ]
    # Vetoes: both sides carry numbers and they differ; one side negated; two or more shared content
    # words (or any two entities) in the opposite order, or two words trading neighbours. A reworded FAQ
    # keeps its content words in order far more often than a different question with the same words;
    # when it does not, it usually moved a whole clause, which is left to the model.
    reason = ""
    if too_long:
        reason = "too_long"  # what the rules did not read may differ: never approved on a truncated comparison
    elif na == nb and key_text(query) != key_text(candidate):
        reason = "layout"  # only case or layout differ, in code or lines, where they matter and no model sees them
    elif nums_a and nums_b and set(nums_a) != set(nums_b):
        reason = "number_mismatch"
    elif _negated(ta) != _negated(tb):
        reason = "negation"
    elif swaps or e_disc or (disc >= 2 and not _one_block_moved(ca, cb)):
        reason = "order"
    return feats, reason


@dataclass(frozen=True)
class VerifierDecision:
    """Outcome for one candidate: the model score, the decision, and why (a rule name or "model")."""

    score: float
    hit: bool
    reason: str


class Verifier(Protocol):
    """Anything that can decide whether a cached answer may serve a reworded request."""

    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision:
        """Decide hit or miss for the nearest cached neighbour."""
        ...

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        """``verify`` for many (query, candidate, cosine, threshold) at once: one model call per batch."""
        ...


FloatArray = npt.NDArray[np.float64]


class TrainedVerifier:
    """MLP over :func:`pair_features`, with the hard rules as vetoes in front of it."""

    def __init__(self, params: dict[str, FloatArray], recall_cosine: float, threshold: float) -> None:
        self._p = params
        self.recall_cosine = recall_cosine
        self.threshold = threshold

    @classmethod
    def load(cls, path: Path | None = None) -> TrainedVerifier:
        """Load the shipped artifact (or another one written by scripts/train_verifier.py)."""
        with np.load(path or ARTIFACT_PATH, allow_pickle=False) as z:
            names = tuple(str(n) for n in z["feature_names"])
            if names != FEATURE_NAMES:
                raise ValueError(f"artifact features {names} do not match this code")
            params = {k: np.asarray(z[k], dtype=np.float64) for k in ("mean", "scale", "w1", "b1", "w2", "b2")}
            return cls(params, float(z["recall_cosine"]), float(z["threshold"]))

    def predict(self, x: FloatArray) -> FloatArray:
        """P(same answer) from a matrix of `pair_features` rows, no vetoes applied."""
        p = self._p
        h = np.maximum((x - p["mean"]) / p["scale"] @ p["w1"] + p["b1"], 0.0)
        logit = (h @ p["w2"] + p["b2"]).reshape(-1)
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -50.0, 50.0)))

    def score_batch(self, pairs: Sequence[tuple[str, str, float]]) -> FloatArray:
        """Probability, per pair, that the cached answer may be served; 0.0 where a rule vetoes."""
        if not pairs:
            return np.zeros(0, dtype=np.float64)
        rows, vetoed = [], []
        for q, c, cos in pairs:
            feats, reason = pair_features(q, c, cos)
            rows.append(feats)
            vetoed.append(bool(reason))
        scores = self.predict(np.asarray(rows, dtype=np.float64))
        scores[np.asarray(vetoed)] = 0.0
        exact = [same_question(q, c) for q, c, _ in pairs]
        scores[np.asarray(exact)] = 1.0
        return scores

    def score(self, query: str, candidate: str, cosine: float) -> float:
        """Probability that ``candidate``'s cached answer may serve ``query`` (0.0 if a rule vetoes)."""
        return float(self.score_batch([(query, candidate, cosine)])[0])

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        return [self.verify(q, c, cos, thr) for q, c, cos, thr in pairs]

    def verify(self, query: str, candidate: str, cosine: float, threshold: float | None = None) -> VerifierDecision:
        """Hard rules veto first; otherwise a hit needs ``score >= threshold``. Exact text is a hit."""
        thr = self.threshold if threshold is None else threshold
        if same_question(query, candidate):
            return VerifierDecision(1.0, True, "exact")
        feats, reason = pair_features(query, candidate, cosine)
        if reason:
            return VerifierDecision(0.0, False, reason)
        s = float(self.predict(np.asarray([feats], dtype=np.float64))[0])
        return VerifierDecision(s, s >= thr, "model")
