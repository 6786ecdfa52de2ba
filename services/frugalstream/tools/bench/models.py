"""The model options the quality benches share, so int8 and fp32 are compared on the same command line."""

from __future__ import annotations

from typing import Any

from frugalstream.llm.embedder import MAX_SEQ_TOKENS


def add_model_arguments(p: Any) -> None:
    p.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                   help="int8: the shipped ONNX models (production); fp32: the torch originals (`train` extra)")
    p.add_argument("--max-tokens", type=int, default=MAX_SEQ_TOKENS,
                   help="tokens of each text the embedder reads (default: %(default)s, as in production)")
