"""Meaning-preserving rewordings: synthetic positives for the dedupe cross-encoder.

The synthetic look-alikes in train_verifier.py teach the model that one changed word can change the
answer. Alone they also teach it that *any* small edit does, and the first cross-encoder scored "My top up
is still pending" / "My top-up is still pending" 0.12. These edits are the ones users make without
meaning anything by them: hyphens and spacing in compounds, contractions, politeness, articles, case,
trailing punctuation, one transposed letter. Each sample applies one or two of them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from frugalstream.llm.verifier import _NEGATIONS
from frugalstream.tools.evals.pair_eval import Pair
from scripts.train_verifier import _is_content

_CONTRACTIONS = (
    ("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("is not", "isn't"),
    ("are not", "aren't"), ("can not", "can't"), ("cannot", "can't"), ("i am", "i'm"), ("it is", "it's"),
    ("what is", "what's"), ("i have", "i've"), ("i would", "i'd"), ("there is", "there's"),
    ("will not", "won't"), ("should not", "shouldn't"), ("how is", "how's"), ("who is", "who's"),
)
_PREFIXES = ("Please, ", "Hi, ", "Hello! ", "Quick question: ", "Can you tell me ", "I'd like to know: ")
_SUFFIXES = (" Thanks!", " Thank you.", " please", " Any help is appreciated.")
_SYNONYM_OPENERS = (("how do i", "how can i"), ("how can i", "how do i"), ("what is", "what's"))


def _swap_case_insensitive(text: str, old: str, new: str) -> str | None:
    m = re.search(rf"\b{re.escape(old)}\b", text, flags=re.IGNORECASE)
    if not m:
        return None
    found = m.group(0)
    repl = new[:1].upper() + new[1:] if found[:1].isupper() else new
    return text[: m.start()] + repl + text[m.end() :]


def _contraction(text: str, rng: random.Random) -> str | None:
    pairs = list(_CONTRACTIONS)
    rng.shuffle(pairs)
    for long, short in pairs:
        for old, new in ((long, short), (short, long)) if rng.random() < 0.5 else ((short, long), (long, short)):
            out = _swap_case_insensitive(text, old, new)
            if out:
                return out
    return None


def _compound(text: str, rng: random.Random) -> str | None:
    """"top up" <-> "top-up" <-> "topup", "e-mail" <-> "email"."""
    hyph = re.findall(r"\b\w+-\w+\b", text)
    if hyph:
        w = rng.choice(hyph)
        return text.replace(w, w.replace("-", rng.choice([" ", ""])), 1)
    words = text.split()
    spots = [i for i in range(len(words) - 1)
             if all(w.isalpha() and w.islower() and _is_content(w) and w not in _NEGATIONS for w in words[i : i + 2])]
    if not spots:
        return None
    i = rng.choice(spots)
    words[i : i + 2] = [words[i] + "-" + words[i + 1]]
    return " ".join(words)


def _politeness(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        prefix = rng.choice(_PREFIXES)
        keep_case = prefix.startswith(("Hello", "Quick")) or text.startswith("I ")
        return prefix + (text if keep_case else text[:1].lower() + text[1:])
    return text.rstrip() + rng.choice(_SUFFIXES)


def _article(text: str, rng: random.Random) -> str | None:
    words = text.split()
    arts = [i for i, w in enumerate(words) if w.lower() in {"the", "a", "an"} and i > 0]
    if not arts:
        return None
    del words[rng.choice(arts)]
    return " ".join(words)


def _surface(text: str, rng: random.Random) -> str:
    kind = rng.choice(["lower", "punct", "space"])
    if kind == "lower":
        return text.lower()
    if kind == "punct":
        stripped = text.rstrip(" ?.!")
        return stripped if stripped != text else text + "?"
    return re.sub(r" ", "  ", text, count=1)


def _typo(text: str, rng: random.Random) -> str | None:
    words = text.split()
    long = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 6 and _is_content(w)
            and w.lower() not in _NEGATIONS]
    if not long:
        return None
    i = rng.choice(long)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _opener(text: str, rng: random.Random) -> str | None:
    old, repl = rng.choice(_SYNONYM_OPENERS)
    return _swap_case_insensitive(text, old, repl)


# Edit and its sampling weight.
_EDITS: tuple[tuple[Callable[[str, random.Random], str | None], int], ...] = (
    (_contraction, 3), (_compound, 3), (_politeness, 3), (_article, 2), (_surface, 2), (_typo, 1), (_opener, 2),
)


def reword(text: str, rng: random.Random) -> str | None:
    """One or two meaning-preserving edits of ``text``, or None when none applies."""
    if not text.strip():
        return None
    out = text
    for _ in range(1 if rng.random() < 0.6 else 2):
        edit = rng.choices([e for e, _ in _EDITS], weights=[w for _, w in _EDITS])[0]
        out = edit(out, rng) or out
    return out if out != text else None


def synthesize_rewordings(sentences: list[str], n: int, rng: random.Random) -> list[Pair]:
    out: list[Pair] = []
    for s in rng.sample(sentences, min(len(sentences), 2 * n)):
        r = reword(s, rng)
        if r:
            out.append((s, r, 1) if rng.random() < 0.5 else (r, s, 1))
        if len(out) >= n:
            break
    return out
