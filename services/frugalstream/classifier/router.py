"""Learned escalation score: how likely a prompt needs the stronger tier.

The score estimates P(the cheap model is wrong and the strong one right) from the prompt's MiniLM
embedding and its shape. Four linear heads trained on RouteLLM's MMLU/GSM8K correctness labels (see
``scripts/train_router.py``) are evaluated with two small matrix products, so inference is pure numpy
and costs microseconds on top of the embedding:

* ridge regression of the gain (strong_correct - weak_correct),
* sigmoid(strong head) - sigmoid(weak head), two logistic regressions,
* a soft topic prior: softmax over subjects times each subject's mean gain,
* a structure head: ridge regression of the gain on the prompt's length, sentence and number counts,
  alone and weighted by the topic posterior of math word problems (a longer word problem has more
  steps for the cheap model to get wrong; the embedding does not see length).

Each is z-scored, summed and Platt-mapped to [0, 1]. The artifact has two variants: ``full``
(every training row; for serving) and ``half`` (only rows outside the held-out hash half; for honest
benches on local data, see ``frugalstream.tools.evals.route_eval.honest_router_and_mask``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


def prompt_key(prompt: str) -> str:
    """Canonical text used for hashing and de-contamination (surrounding whitespace ignored)."""
    return prompt.strip()


def prompt_hash64(prompt: str) -> int:
    """Stable 64-bit hash of a prompt (first 8 bytes of SHA-256); Python's hash() is salted."""
    digest = hashlib.sha256(prompt_key(prompt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def heldout_mask(prompts: list[str]) -> npt.NDArray[np.bool_]:
    """True for rows in the held-out half: SHA-256(prompt) low bit is 1 (~50%, same for duplicates)."""
    return np.array([prompt_hash64(p) & 1 == 1 for p in prompts], dtype=bool)



DEFAULT_PATH = Path(__file__).with_name("router_model.npz")
DIM = 384
_PARAMS = ("W", "b", "rate", "zmean", "zstd", "cal", "smean", "sstd", "sw", "sb", "math_class")
# Starts only at the first mark of a run (a run of "!" with no space after it is otherwise retried from every
# mark: quadratic); the splits are the same.
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]+\s")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

FloatArray = npt.NDArray[np.float32]


def _sigmoid(z: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def structure_features(texts: Sequence[str]) -> FloatArray:
    """(n, 4) log counts of words, sentences, numbers and distinct numbers."""
    rows = []
    for text in texts:
        nums = _NUMBER.findall(text)
        rows.append([len(text.split()), len(_SENTENCE_END.split(text)), len(nums), len(set(nums))])
    return np.log1p(np.asarray(rows, dtype=np.float32).reshape(-1, 4))


def topic_posterior(params: Mapping[str, npt.NDArray[Any]], x: npt.NDArray[Any]) -> FloatArray:
    logits = x.astype(np.float32, copy=False) @ params["W"][3:].T + params["b"][3:]
    logits = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    return np.asarray(prob / prob.sum(axis=1, keepdims=True), dtype=np.float32)


def structure_inputs(params: Mapping[str, npt.NDArray[Any]], posterior: FloatArray, texts: Sequence[str]) -> FloatArray:
    """Standardized structure features, alone and times P(math word problem) from ``topic_posterior``."""
    s = (structure_features(texts) - params["smean"]) / params["sstd"]
    math = posterior[:, int(params["math_class"])]
    return np.hstack([s, s * math[:, None]]).astype(np.float32)


def predict_parts(params: Mapping[str, npt.NDArray[Any]], x: npt.NDArray[Any], texts: Sequence[str]) -> FloatArray:
    """(n, 4) head outputs before z-scoring: ridge gain, P(strong)-P(weak), topic prior gain, structure."""
    z = x.astype(np.float32, copy=False) @ params["W"][:3].T + params["b"][:3]
    posterior = topic_posterior(params, x)
    topic = posterior @ params["rate"]
    shape = structure_inputs(params, posterior, texts) @ params["sw"] + params["sb"]
    return np.stack([z[:, 0], _sigmoid(z[:, 2]) - _sigmoid(z[:, 1]), topic, shape], axis=1).astype(np.float32)


class EscalationRouter:
    """Scores L2-normalized 384-d embeddings; higher = more likely to need a stronger tier."""

    def __init__(
        self,
        params: Mapping[str, npt.NDArray[Any]],
        train_hashes: npt.NDArray[np.uint64],
        meta: dict[str, Any],
        variant: str,
    ) -> None:
        missing = [k for k in _PARAMS if k not in params]
        if missing:
            raise ValueError(f"router artifact lacks {missing}")
        self.params = {k: np.asarray(params[k], dtype=np.float32) for k in _PARAMS}
        if self.params["W"].shape[1] != DIM:
            raise ValueError(f"router expects {DIM}-d embeddings, artifact has {self.params['W'].shape[1]}")
        self.train_hashes = np.sort(np.asarray(train_hashes, dtype=np.uint64))
        self.meta = meta
        self.variant = variant

    @classmethod
    def load(cls, path: Path | None = None, exclude_heldout: bool = False) -> EscalationRouter:
        """Load the shipped artifact. ``exclude_heldout=True`` gives the variant trained without any
        row of the held-out hash half, the only one that may be benched on local RouteLLM data."""
        variant = "half" if exclude_heldout else "full"
        with np.load(path or DEFAULT_PATH, allow_pickle=False) as z:
            params = {k: z[f"{variant}/{k}"] for k in _PARAMS}
            hashes = z[f"{variant}/hashes"]
            meta = json.loads(str(z["meta_json"]))
        return cls(params, hashes, meta, variant)

    def score(self, embeddings: npt.NDArray[Any], texts: Sequence[str]) -> FloatArray:
        """(n, 384) float32 L2-normalized embeddings of ``texts`` -> (n,) escalation score in [0, 1]."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != DIM:
            raise ValueError(f"expected (n, {DIM}) embeddings, got {x.shape}")
        if len(texts) != len(x):
            raise ValueError(f"got {len(texts)} texts for {len(x)} embeddings")
        p = self.params
        raw = ((predict_parts(p, x, texts) - p["zmean"]) / p["zstd"]).sum(axis=1)
        return _sigmoid(p["cal"][0] * raw + p["cal"][1]).astype(np.float32)

    def seen(self, prompts: list[str]) -> npt.NDArray[np.bool_]:
        """True for prompts this variant was trained on (exact text, surrounding whitespace ignored)."""
        h = np.array([prompt_hash64(p) for p in prompts], dtype=np.uint64)
        if len(self.train_hashes) == 0 or len(h) == 0:
            return np.zeros(len(h), dtype=bool)
        i = np.clip(np.searchsorted(self.train_hashes, h), 0, len(self.train_hashes) - 1)
        return np.asarray(self.train_hashes[i] == h)
