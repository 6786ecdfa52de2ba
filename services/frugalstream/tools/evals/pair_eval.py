"""Pair-level evaluation of the semantic-hit decision path, shared by the eval script and the bench.

The decision path is the production one: a pair is a hit only if its embedding cosine reaches the recall
threshold AND the verifier accepts it. It is always reported next to the plain cosine >= 0.95 baseline,
because that baseline is what a naive semantic cache does.

QQP ships without a split field, so :func:`qqp_split` defines one deterministically: questions that
share a pair are joined into connected components, and a component's bucket comes from a hash of its
smallest normalized question. No question string is ever in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from frugalstream.llm.verifier import VerifierDecision, normalize_text

BASELINE_COSINE = 0.95
Pair = tuple[str, str, int]


class _BatchScorer(Protocol):
    def score_batch(self, pairs: Sequence[tuple[str, str, float]]) -> npt.NDArray[np.float64]: ...


class _PairVerifier(Protocol):
    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision: ...


def _rates(hit: npt.NDArray[np.bool_], label: npt.NDArray[np.bool_]) -> dict[str, float | int]:
    tp, fp = int((hit & label).sum()), int((hit & ~label).sum())
    pos, neg = int(label.sum()), int((~label).sum())
    return {
        "hits": tp + fp,
        "true_hits": tp,
        "false_hits": fp,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / pos if pos else 0.0,
        "false_hit_rate": fp / neg if neg else 0.0,
    }


def evaluate_pairs(
    pairs: list[Pair],
    embed: Callable[[list[str]], np.ndarray],
    verifier: _BatchScorer | _PairVerifier,
    recall_cosine: float,
    threshold: float,
) -> dict[str, Any]:
    """Precision, recall and false-hit rate (false hits / all negatives) of cosine-gate + verifier.

    ``embed`` maps texts to embeddings (normalized or not); each distinct text is embedded once.
    A verifier with ``score_batch`` is scored in one batch, otherwise ``verify`` is called per pair.
    """
    texts = sorted({t for a, b, _ in pairs for t in (a, b)})
    index = {t: i for i, t in enumerate(texts)}
    emb = np.asarray(embed(texts), dtype=np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    ia = np.array([index[a] for a, _, _ in pairs], dtype=np.int64)
    ib = np.array([index[b] for _, b, _ in pairs], dtype=np.int64)
    cos = np.einsum("ij,ij->i", emb[ia], emb[ib])
    label = np.array([y == 1 for _, _, y in pairs], dtype=bool)
    gate = cos >= recall_cosine
    asked = [(pairs[i][0], pairs[i][1], float(cos[i])) for i in np.flatnonzero(gate)]
    hit = np.zeros(len(pairs), dtype=bool)
    if asked:
        if hasattr(verifier, "score_batch"):
            ok = np.asarray(verifier.score_batch(asked)) >= threshold
        else:
            ok = np.array([verifier.verify(q, c, s, threshold).hit for q, c, s in asked])
        hit[np.flatnonzero(gate)] = ok
    return {
        "pairs": len(pairs),
        "positives": int(label.sum()),
        "negatives": int((~label).sum()),
        "recall_cosine": recall_cosine,
        "threshold": threshold,
        "asked_verifier": len(asked),
        **_rates(hit, label),
        "baseline": {"cosine": BASELINE_COSINE, **_rates(cos >= BASELINE_COSINE, label)},
    }


def qqp_split(rows: Sequence[dict[str, Any]], dev_buckets: int = 2, val_buckets: int = 1) -> list[str]:
    """Assign each QQP row to "dev", "val" or "train" (10 hash buckets: 0-1 dev, 2 val by default)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = [(normalize_text(r["text_a"]), normalize_text(r["text_b"])) for r in rows]
    for a, b in keys:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    smallest: dict[str, str] = {}
    for node in list(parent):
        root = find(node)
        smallest[root] = min(smallest.get(root, node), node)
    out = []
    for a, _ in keys:
        bucket = int(hashlib.sha1(smallest[find(a)].encode()).hexdigest(), 16) % 10
        out.append("dev" if bucket < dev_buckets else "val" if bucket < dev_buckets + val_buckets else "train")
    return out


def load_qqp(path: Path) -> dict[str, list[Pair]]:
    """QQP pairs grouped by :func:`qqp_split`."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "dev": []}
    for row, split in zip(rows, qqp_split(rows), strict=True):
        splits[split].append((row["text_a"], row["text_b"], int(row["label"])))
    return splits


def load_paws(path: Path) -> list[Pair]:
    """PAWS-Wiki pairs (tab-separated, header, bare quotes: QUOTE_NONE)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["sentence1"], r["sentence2"], int(r["label"])) for r in reader]
