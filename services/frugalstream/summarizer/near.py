"""Near-duplicate items (the same product listed twice with small edits), reused only when a job asks.

A wrong merge gives an item another item's summary, so matching is deliberately conservative: two items
merge only if every check passes:
1. the same set of tokens containing digits (model numbers, sizes, wattages) and the same negations:
   "KDL-40" vs "KDL-46", or "with remote" vs "no remote", are different products whatever the wording;
2. no name in one that the other does not mention: "made by Steelcase" vs "made by Herman Miller" are
   different products. A name is a capitalised word, read before `normalize_text` lowercases it, that opens
   no sentence (or line) and is no function word ("The", "With" in a title are not names);
3. word-set Jaccard >= `jaccard` (default 0.85);
4. when an embedder is given, embedding cosine >= `cosine` (default 0.95);
5. when an embedder is given and the dedupe service's trained verifier is available, it must accept too
   (its features include the cosine, so it is never asked without a real one).
Items are bucketed by rule 1 first, so only items that could merge are ever compared.

A member merges only into a representative it was itself compared with and passed: never into the
representative of an item it resembles, since small edits add up (A <- B <- C <- D would give D the summary
of an A that fails every check against it). Among the representatives it passes, the closest one wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from frugalstream.llm.cache_keys import normalize_text
from frugalstream.llm.embedder import AsyncEmbedder
from frugalstream.llm.verifier import Verifier, mentioned, names

_WORD = re.compile(r"\w+")
_NEGATIONS = frozenset({"no", "not", "non", "without", "never", "none", "nor", "excluding", "except", "lacks"})
MAX_BUCKET = 2_000


def load_verifier() -> Verifier | None:
    """The dedupe service's verifier if its trained artifact is present; otherwise lexical checks only."""
    try:
        from frugalstream.llm.verifier import TrainedVerifier

        return TrainedVerifier.load()
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None


@dataclass(frozen=True)
class _Doc:
    key: str
    text: str
    words: frozenset[str]  # of the normalized text: what Jaccard compares
    folded: frozenset[str]  # every word casefolded: whether a name is mentioned at all, in any case
    names: frozenset[str]

    @classmethod
    def of(cls, key: str, text: str) -> _Doc:
        return cls(key, text, frozenset(_WORD.findall(normalize_text(text))), mentioned(text), names(text))

    def names_differ(self, other: _Doc) -> bool:
        return bool(self.names - other.folded or other.names - self.folded)


def _block(text: str) -> tuple[frozenset[str], frozenset[str]]:
    words = _WORD.findall(normalize_text(text))
    return (frozenset(w for w in words if any(ch.isdigit() for ch in w)),
            frozenset(w for w in words if w in _NEGATIONS))


@dataclass
class NearDuplicates:
    """`embedder_factory` is called on the first job that asks, so the model never loads for jobs that do not."""

    embedder_factory: Callable[[], AsyncEmbedder] | None = None
    verifier: Verifier | None = None
    jaccard: float = 0.85
    cosine: float = 0.95
    verify_threshold: float = 0.7

    async def representatives(self, texts: Mapping[str, str]) -> dict[str, str]:
        """key -> the key of the earlier item it duplicates (only keys that merge are returned); every returned
        key is a representative, and every member passed every check against its own representative."""
        buckets: dict[tuple[frozenset[str], frozenset[str]], list[_Doc]] = {}
        for key, text in texts.items():
            buckets.setdefault(_block(text), []).append(_Doc.of(key, text))
        candidates: list[tuple[_Doc, _Doc, float]] = []  # (doc, an earlier doc of its bucket, Jaccard)
        for docs in buckets.values():
            docs = docs[:MAX_BUCKET]
            for i, doc in enumerate(docs[1:], start=1):
                for earlier in docs[:i]:
                    union = len(doc.words | earlier.words)
                    jaccard = len(doc.words & earlier.words) / union if union else 0.0
                    if jaccard >= self.jaccard and not doc.names_differ(earlier):
                        candidates.append((doc, earlier, jaccard))
        cosines = await self._cosines([(doc, earlier) for doc, earlier, _ in candidates])
        options: dict[str, list[tuple[float, float, int, _Doc, _Doc]]] = {}  # in document order
        for n, ((doc, earlier, jaccard), cos) in enumerate(zip(candidates, cosines, strict=True)):
            if cos >= self.cosine:
                options.setdefault(doc.key, []).append((-cos, -jaccard, n, doc, earlier))
        verifier = self.verifier if self.embedder_factory is not None else None
        merged: dict[str, str] = {}
        for found in options.values():  # an earlier doc's fate is settled before any later doc looks at it
            for neg_cos, _, _, doc, earlier in sorted(found):
                if earlier.key in merged:
                    continue  # a member represents nobody: no chains
                if verifier is not None and not verifier.verify(doc.text, earlier.text, -neg_cos,
                                                                self.verify_threshold).hit:
                    continue
                merged[doc.key] = earlier.key
                break
        return merged

    async def _cosines(self, pairs: Sequence[tuple[_Doc, _Doc]]) -> list[float]:
        if self.embedder_factory is None or not pairs:
            return [1.0] * len(pairs)
        keys = list(dict.fromkeys(d.key for pair in pairs for d in pair))
        text = {d.key: d.text for pair in pairs for d in pair}
        vectors = await self.embedder_factory().embed([text[k] for k in keys])
        row = {k: i for i, k in enumerate(keys)}
        return [float(np.dot(vectors[row[a.key]], vectors[row[b.key]])) for a, b in pairs]
