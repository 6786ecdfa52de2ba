"""Answer clusters: the second semantic path, for a rewording the verifier did not accept.

The verifier only compares a request with its nearest cached question, but the cache also knows which of its
questions share an answer. Cached entries of one shard whose answers normalize to the same text form a cluster;
a kNN vote and the clusters' centroids give features, and a logistic model fitted offline
(scripts/export_answer_cluster_model.py, numpy only at run time) turns them into a confidence that the winning
cluster's answer is right. The math is that of `features` and `Logistic` in scripts/answer_clusters_experiment.py
as exported: the JSON carries reference cases the experiment computed, which the unit tests replay here.

A cluster lives inside one shard (one scope and conversation prefix), so it never crosses a tenant's wall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

from frugalstream.llm.embedder import DIM
from frugalstream.llm.judges import normalize
from frugalstream.llm.onnx_models import ANSWER_CLUSTER_FILE, MODELS_DIR

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MODEL_FILE = MODELS_DIR / ANSWER_CLUSTER_FILE
#: Raw features, in the experiment's order; the model's design adds three margins (see `ClusterModel.design`).
FEATURES = ("top", "top_other", "share", "support", "cent", "cent_other", "log_size", "mean_q", "intra")


def features(sims: F32, ans: I64, norm2: F64, size: I64, k: int, temperature: float) -> tuple[int, int, F64]:
    """(winning cluster, position of its most similar member, raw features) of one query.

    sims/ans: cosine to, and cluster of, each clustered entry; norm2/size: per cluster, the squared norm of the
    sum of its member vectors and its member count. Votes of the k nearest weigh exp((cos - top) / temperature);
    top_other is the best other answer's cosine among the k nearest (else the k-th cosine, a bound), a centroid
    cosine is q.S/|S|, and the mean pairwise cosine inside a cluster is (|S|^2 - n) / (n (n - 1)).
    """
    kk = min(k, len(sims))
    top = np.argpartition(-sims, kk - 1)[:kk] if kk < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top])]
    w = np.exp((sims[top] - sims[top[0]]) / temperature)
    votes = np.bincount(ans[top], weights=w)
    win = int(votes.argmax())
    num = np.bincount(ans, weights=sims, minlength=len(norm2))
    cent = num / np.sqrt(np.maximum(norm2, 1e-9))
    cent_win, n_win = cent[win], int(size[win])
    cent[(size == 0) | (np.arange(len(cent)) == win)] = -1.0
    other = ans[top] != win
    best = int(top[np.argmin(other)])  # the winner's nearest member is always among the k nearest
    top_other = float(sims[top[other]].max()) if other.any() else float(sims[top[-1]])  # else bound: k-th cosine
    intra = (norm2[win] - n_win) / (n_win * (n_win - 1)) if n_win > 1 else 1.0
    f = np.array([sims[best], top_other, votes[win] / w.sum(), (~other).sum(), cent_win, cent.max(),
                  np.log1p(n_win), num[win] / n_win, intra], dtype=np.float64)
    return win, best, f


@dataclass(frozen=True)
class ClusterModel:
    """The fitted logistic model (standardized design columns) and the serving rule it was tuned with."""

    names: tuple[str, ...]
    mean: F64
    std: F64
    weights: F64
    bias: float
    k: int
    temperature: float
    min_size: int
    threshold: float

    @staticmethod
    def design(f: F64) -> F64:
        """The 8 first raw features, then the margins top - top_other, cent - cent_other, mean_q - intra."""
        return np.concatenate([f[:8], [f[0] - f[1], f[4] - f[5], f[7] - f[8]]])

    def prob(self, f: F64) -> float:
        x = (self.design(f) - self.mean) / self.std
        return float(1.0 / (1.0 + np.exp(-(x @ self.weights + self.bias))))

    @classmethod
    def load(cls, path: Path = MODEL_FILE) -> ClusterModel:
        raw = json.loads(path.read_text())
        names = tuple(str(n) for n in raw["features"])
        mean, std, weights = (np.asarray(raw[key], dtype=np.float64) for key in ("mean", "std", "weights"))
        if any(a.shape != (len(names),) for a in (mean, std, weights)) or len(names) != len(FEATURES) + 2:
            raise ValueError(f"{path}: mean, std and weights must each have one value per feature ({len(names)})")
        return cls(names, mean, std, weights, bias=float(raw["bias"]), k=int(raw["k"]),
                   temperature=float(raw["temperature"]), min_size=int(raw["min_cluster_size"]),
                   threshold=float(raw["threshold"]))


@cache
def shipped_model() -> ClusterModel:
    """The packaged model, read once."""
    return ClusterModel.load()


@dataclass(frozen=True)
class Vote:
    """A query's confidence in its winning cluster, with what is needed to pick the member that serves."""

    confidence: float
    cluster: int
    sims: F32  # cosine to each clustered entry (rows of `AnswerClusters`)


class AnswerClusters:
    """The clusters of one shard: member vectors stacked for exact numpy similarities, and per cluster the sum
    of its member vectors, that sum's squared norm and the member count, kept up to date on every add.

    Exact similarities cost O(entries x 384) per query (the whole path ~0.4 ms at up to 3,000 entries), fine
    for one tenant scope's FAQ cache; past some tens of thousands of entries per shard, the kNN vote would take
    FAISS top-K and the centroid cosines q.S over the cluster sums instead of every entry's cosine.
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self.positions: list[int] = []  # entry position (in the shard) of each row
        # Arrays grown by doubling (adds stay amortized O(1)): rows [:len(self)], clusters [:len(self._ids)].
        self._matrix = np.zeros((16, DIM), dtype=np.float32)
        self._answer = np.zeros(16, dtype=np.int64)
        self._sums = np.zeros((16, DIM), dtype=np.float64)
        self._norm2 = np.zeros(16, dtype=np.float64)
        self._size = np.zeros(16, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def sums(self) -> F64:
        return self._sums[: len(self._ids)]

    @property
    def norm2(self) -> F64:
        return self._norm2[: len(self._ids)]

    @property
    def size(self) -> I64:
        return self._size[: len(self._ids)]

    def add(self, position: int, content: str, vector: F32) -> None:
        """Adds the shard's entry at `position`; an entry without text content joins no cluster."""
        key = normalize(content)
        if not key:
            return
        cid = self._ids.setdefault(key, len(self._ids))
        if cid == len(self._size):
            self._sums, self._norm2, self._size = (np.concatenate([a, np.zeros_like(a)])
                                                   for a in (self._sums, self._norm2, self._size))
        n = len(self.positions)
        if n == len(self._answer):
            self._matrix, self._answer = (np.concatenate([a, np.zeros_like(a)]) for a in (self._matrix, self._answer))
        self._matrix[n], self._answer[n] = vector, cid
        self.positions.append(position)
        self._sums[cid] += vector
        self._norm2[cid] = float(self._sums[cid] @ self._sums[cid])
        self._size[cid] += 1

    def similarities(self, queries: F32) -> F32:
        """Cosine of each query (rows) to each clustered entry (columns): vectors are unit norm. FAISS's SIMD
        kernel runs on the calling thread (FAISS is pinned to one); numpy's BLAS would spread each product over
        every core and, on a loaded host, spin-wait (10 ms tails at 3,000 entries where this takes 0.2 ms)."""
        n, kernel = len(self.positions), faiss.fvec_inner_products_ny  # type: ignore[attr-defined]
        out = np.zeros((len(queries), n), dtype=np.float32)
        for row, q in zip(out, np.ascontiguousarray(queries, dtype=np.float32), strict=True):
            kernel(faiss.swig_ptr(row), faiss.swig_ptr(q), faiss.swig_ptr(self._matrix), DIM, n)
        return out

    def vote(self, sims: F32, model: ClusterModel) -> Vote | None:
        """The model's confidence in the winning cluster; 0 when it has fewer than `min_size` members."""
        if not self.positions:
            return None
        win, _, f = features(sims, self._answer[: len(self.positions)], self.norm2, self.size, model.k,
                             model.temperature)
        confidence = model.prob(f) if int(self.size[win]) >= model.min_size else 0.0
        return Vote(confidence, win, sims)

    def members(self, vote: Vote) -> list[tuple[int, float]]:
        """(entry position, cosine) of the winning cluster's members, most similar first."""
        rows = np.flatnonzero(self._answer[: len(self.positions)] == vote.cluster)
        rows = rows[np.argsort(-vote.sims[rows], kind="stable")]
        return [(self.positions[int(r)], float(vote.sims[r])) for r in rows]
