"""`frugalstream bench embed`: the fp32 and int8 embedders on the same texts in one run.

For each precision and token length: texts per second one at a time (a lone request) and in batches (a
busy classifier), and how far the vectors move from the fp32 reference at the production length (mean and
minimum cosine). The LRU of repeated texts is bypassed: every text is encoded. By default the texts are the
demo workload's lookup texts (what the classifier embeds), so lengths are those of real requests.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from frugalstream.llm.embedder import MAX_SEQ_TOKENS, MiniLMEmbedder, Precision, Vectors
from frugalstream.runtime.settings import UsageError


def demo_lookup_texts() -> list[str]:
    from frugalstream.llm.cache_keys import clean_text, split_conversation
    from frugalstream.tools.demo_workload import load_demo_workload

    return [clean_text(split_conversation(r.messages)[2]) for r in load_demo_workload()]


def read_texts(path: Path) -> list[str]:
    """One text per line, or JSON lines with a `text` field. A missing file, or a JSON line that is not an
    object with `text`, is a UsageError naming the file (and line): the command prints one line, exit 2."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"bench embed --texts {path}: {exc.strerror or exc}") from None
    texts = []
    for n, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError):
                raise UsageError(f"bench embed --texts {path}:{n}: not a JSON object with a `text` field") from None
        elif line.strip():
            texts.append(line.strip())
    return texts


def rate(embedder: MiniLMEmbedder, texts: Sequence[str], batch: int) -> tuple[float, Vectors]:
    """Texts per second, encoding `batch` texts per call (the encoder sorts each call by length)."""
    encode = embedder._encoder.encode  # the model itself: the text LRU would turn repeats into lookups
    encode(list(texts[:8]))  # warm-up: first calls allocate
    started = time.perf_counter()
    parts = [encode(list(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    elapsed = time.perf_counter() - started
    return len(texts) / elapsed, np.concatenate(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = read_texts(Path(args.texts)) if args.texts else demo_lookup_texts()
    texts = texts[: args.limit] if args.limit else texts
    lengths = [int(x) for x in str(args.max_tokens).split(",")]
    rows: list[dict[str, Any]] = []
    reference: Vectors | None = None
    precisions: list[Precision] = ["fp32", "int8"] if not args.int8_only else ["int8"]
    for precision in precisions:
        for max_tokens in lengths:
            embedder = MiniLMEmbedder(precision=precision, max_seq_tokens=max_tokens, batch_size=args.batch,
                                      threads=args.threads)
            one, vectors = rate(embedder, texts, 1)
            batched, _ = rate(embedder, texts, args.batch)
            if reference is None and precision == "fp32" and max_tokens == MAX_SEQ_TOKENS:
                reference = vectors
            row: dict[str, Any] = {"precision": precision, "max_tokens": max_tokens,
                                   "texts_per_s_one_at_a_time": round(one, 1),
                                   "texts_per_s_batched": round(batched, 1)}
            if reference is not None:
                cos = np.sum(vectors * reference, axis=1)
                row.update(cosine_to_fp32_mean=round(float(cos.mean()), 4),
                           cosine_to_fp32_min=round(float(cos.min()), 4))
            rows.append(row)
    return {"texts": len(texts), "source": args.texts or "demo workload lookup texts", "threads": args.threads,
            "batch": args.batch, "reference": f"fp32 at {MAX_SEQ_TOKENS} tokens", "rows": rows}


def cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    result = run(args)
    table = Table(title=f"bench embed: {result['texts']} texts ({result['source']}), {result['threads']} thread(s)")
    for col in ("precision", "max tokens", "texts/s one at a time", f"texts/s batch {result['batch']}",
                "cosine to fp32 mean", "min"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(row["precision"], str(row["max_tokens"]), f"{row['texts_per_s_one_at_a_time']:.0f}",
                      f"{row['texts_per_s_batched']:.0f}",
                      str(row.get("cosine_to_fp32_mean", "-")), str(row.get("cosine_to_fp32_min", "-")))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_embed_bench(kinds: Any) -> None:
    p = kinds.add_parser("embed", help="fp32 and int8 embedders on the same texts: speed and cosine between them")
    p.add_argument("--texts", help="a file of texts (one per line, or JSON lines with `text`); default: demo")
    p.add_argument("--limit", type=int, help="use the first N texts")
    p.add_argument("--max-tokens", default=str(MAX_SEQ_TOKENS),
                   help="comma-separated token lengths to compare, e.g. 256,128,64 (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="texts per call in the batched run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="model threads, as the setting model_threads")
    p.add_argument("--int8-only", action="store_true", help="skip fp32 (for installs without the train extra)")
    p.add_argument("--json", help="write the result as JSON")
    p.set_defaults(func=cmd)
