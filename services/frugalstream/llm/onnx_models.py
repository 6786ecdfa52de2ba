"""Our two models at inference: int8 ONNX graphs on ONNX Runtime, tokenized by the `tokenizers` library.

The graphs ship in `llm/models/` (built by scripts/export_onnx.py from the installed fp32 weights), so the
services need neither torch nor a download. Pooling, normalization and the cross-encoder's head are inside
the graphs: a call is tokenize, pad to the longest in the batch, run.

Sessions are blocking and CPU-bound: callers run them on a worker thread (`AsyncEmbedder`, dedupe's pool).
One intra-op thread by default: the services of one process share two cores. One text per run by default
too: dynamic int8 quantizes activations with one scale per tensor, so in a batch a text's vector depends on
its neighbours (cosine 0.990 to itself alone, measured); alone, a text always gets the same vector, which a
cache needs, and the cost per token is within 15% of batched runs (measured: about 200 us a token either way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MODELS_DIR = Path(__file__).with_name("models")
EMBEDDER_FILE = "minilm-l6.int8.onnx"
PAIR_ENCODER_FILE = "pair-encoder.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"


class ModelArtifactError(RuntimeError):
    """A shipped model file is missing or does not load: the install is broken, not the input."""


def session(path: Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise ModelArtifactError(f"model file {path} is missing: reinstall frugalstream or run "
                                 "scripts/export_onnx.py")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings about unused initializers are noise in service logs
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def tokenizer(max_tokens: int, models_dir: Path = MODELS_DIR) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models_dir / TOKENIZER_FILE))
    tok.enable_truncation(max_length=max_tokens, strategy="longest_first")
    tok.no_padding()  # batches are padded here, to their own longest
    return tok


@cache
def manifest(models_dir: Path = MODELS_DIR) -> dict[str, Any]:
    path = models_dir / MANIFEST_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelArtifactError(f"model manifest {path} is unreadable: {exc}") from exc
    return data


ANSWER_CLUSTER_FILE = "answer_clusters.json"


@cache
def shipped_answer_cluster_threshold(models_dir: Path = MODELS_DIR) -> float:
    """The answer-cluster model's confidence threshold as shipped (tuned for 1% false hits)."""
    return float(json.loads((models_dir / ANSWER_CLUSTER_FILE).read_text())["threshold"])


def padded(encodings: Sequence[Any], *, types: bool = False) -> dict[str, npt.NDArray[np.int64]]:
    """Right-padded to the longest of these encodings (pad id 0, as the tokenizer's [PAD])."""
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    type_ids = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n] = e.ids
        mask[row, :n] = 1
        if types:
            type_ids[row, :n] = e.type_ids
    feed = {"input_ids": ids, "attention_mask": mask}
    if types:
        feed["token_type_ids"] = type_ids
    return feed


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int = 1024) -> list[list[int]]:
    """Indices grouped by length, each batch padded to its longest within a token budget.

    A batch costs about (its size x its longest text): one 256-token text among fifteen short ones made a
    batch of 16 cost 4x what the same texts cost one at a time, so batches are cut by padded tokens too.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the text being added is the batch's longest
        if current and (len(current) >= batch_size or lengths[i] * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class OnnxTextEncoder:
    """Sentence embeddings (mean pooled, L2-normalized) from the int8 MiniLM graph."""

    def __init__(self, *, max_tokens: int, batch_size: int = 1, threads: int = 1,
                 models_dir: Path = MODELS_DIR, file: str = EMBEDDER_FILE) -> None:
        self._session = session(models_dir / file, threads)
        self._tokenizer = tokenizer(max_tokens, models_dir)
        self._batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), 384), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        for idx in length_batches([len(e.ids) for e in encodings], self._batch_size):
            out[idx] = self._session.run(None, padded([encodings[i] for i in idx]))[0]
        return out


class OnnxPairScorer:
    """P(same answer) from the int8 cross-encoder graph over "[CLS] a [SEP] b [SEP]" (`PairScorer`)."""

    def __init__(self, *, max_tokens: int = 128, batch_size: int = 1, threads: int = 1,
                 models_dir: Path = MODELS_DIR, file: str = PAIR_ENCODER_FILE) -> None:
        self._session = session(models_dir / file, threads)
        self._tokenizer = tokenizer(max_tokens, models_dir)
        self._batch_size = batch_size

    def probabilities(self, a: Sequence[str], b: Sequence[str]) -> npt.NDArray[np.float64]:
        out = np.zeros(len(a), dtype=np.float64)
        if not len(a):
            return out
        encodings = self._tokenizer.encode_batch(list(zip(a, b, strict=True)))
        for idx in length_batches([len(e.ids) for e in encodings], self._batch_size):
            feed = padded([encodings[i] for i in idx], types=True)
            logits = np.asarray(self._session.run(None, feed)[0], dtype=np.float64)
            out[idx] = 1.0 / (1.0 + np.exp(-np.clip(logits, -50.0, 50.0)))
        return out
