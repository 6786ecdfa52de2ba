"""`frugalstream bench summarize`: N summarization requests with Zipf-like repeats over a set of items, through
the summarizer on the embedded broker with the simulated provider, priced like the accountant prices them.

The baseline is one call per request on the baseline model; the report splits wall time from the time spent
inside the summarizer, since the embedded broker (Tansu) and not the service dominates the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from frugalstream.llm.cache_keys import normalize_text
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.runtime.logging import configure_logging
from frugalstream.schemas import SummarizeItem
from frugalstream.summarizer.app import SummarizerService
from frugalstream.summarizer.logic import SummarizerConfig
from frugalstream.tools.backfill import load_items, run_backfill, split_job, text_encoding
from frugalstream.tools.demo import demo_settings
from frugalstream.tools.job_report import job_report
from frugalstream.tools.local_cluster import local_cluster, run_services

INSTRUCTION = "Summarize this product description in one sentence for a catalog listing."


def distinct_texts(items: list[SummarizeItem], limit: int) -> list[str]:
    """The first `limit` distinct (after normalization) non-empty texts, in file order."""
    seen: dict[str, str] = {}
    for item in items:
        key = normalize_text(item.text)
        if key and key not in seen:
            seen[key] = item.text
        if len(seen) >= limit:
            break
    return list(seen.values())


def draw(texts: list[str], n: int, *, zipf_s: float = 1.1, seed: int = 7) -> list[SummarizeItem]:
    """Request k asks for the item of popularity rank r with probability proportional to 1 / r^s."""
    rng = random.Random(seed)
    ranks = list(range(len(texts)))
    rng.shuffle(ranks)  # popularity is not file order
    weights = [1.0 / (r + 1) ** zipf_s for r in range(len(texts))]
    picks = rng.choices(ranks, weights=weights, k=n)
    return [SummarizeItem(id=f"r{k}", text=texts[i]) for k, i in enumerate(picks)]


async def run_bench(texts: list[str], requests: int, *, latency_scale: float = 0.05, deadline_s: int | None = None,
                    model: str | None = None, seed: int = 7, console: Console | None = None) -> dict[str, Any]:
    """`model` pins the model (and so the baseline): savings then come from dedupe, packing and batch alone."""
    console = console or Console(stderr=True)
    items = draw(texts, requests, seed=seed)
    async with local_cluster(partial(demo_settings, latency_scale=latency_scale)) as cluster:
        settings = cluster.settings
        parts = split_job("bench-summarize", "bench", INSTRUCTION, items, deadline_s=deadline_s, model=model,
                          max_bytes=int(settings.max_message_bytes * 0.9))
        started = time.monotonic()
        async with run_services(settings, ["summarizer"]) as running:
            outcome = await run_backfill(settings, parts, timeout_s=1800.0, console=console)
            wall = time.monotonic() - started
            service = running.service("summarizer")
            assert isinstance(service, SummarizerService)
            busy = service.busy_s
    report = job_report(outcome, PriceCatalog.load())
    per_call = SummarizerConfig().pack_items
    return {
        "requests": requests, "distinct_items_offered": len(texts), "parts": len(parts), **report,
        "items_per_call_max": per_call, "model_calls_bound": math.ceil(len(texts) / per_call),
        "wall_time_s": round(wall, 2), "summarizer_time_s": round(busy, 2), "latency_scale": latency_scale,
        "batch_api": "simulated" if deadline_s else "off", "model": model or "default", "provider": "simulated",
        "zipf_s": 1.1, "seed": seed,
    }


def print_bench(report: dict[str, Any], console: Console) -> None:
    table = Table(title="bench summarize (simulated provider, embedded broker)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("requests", "unique_items", "model_calls", "model_calls_bound", "parts", "errors",
                "input_tokens", "output_tokens"):
        table.add_row(key, str(report[key]))
    table.add_row("baseline_cost_usd", f"{report['baseline_cost_usd']:.6f}")
    table.add_row("actual_cost_usd", f"{report['actual_cost_usd']:.6f}")
    table.add_row("savings_pct", f"{report['savings_pct']:.3f}")
    for strategy, saved in report["by_strategy"].items():
        table.add_row(f"  saved by {strategy}", f"{saved:.6f}")
    table.add_row("wall_time_s", str(report["wall_time_s"]))
    table.add_row("summarizer_time_s", str(report["summarizer_time_s"]))
    console.print(table)


def cmd_bench_summarize(args: argparse.Namespace) -> int:
    configure_logging("WARNING", fmt="console")
    console = Console()
    texts = distinct_texts(load_items(Path(args.items), args.text_col, None, args.encoding), args.distinct)
    deadline = 86_400 if args.batch else None
    report = asyncio.run(run_bench(texts, args.requests, latency_scale=args.latency_scale, deadline_s=deadline,
                                   model=args.model, seed=args.seed))
    report["command"] = (f"frugalstream bench summarize --items {args.items} --text-col {args.text_col} "
                         f"--requests {args.requests}" + (" --batch" if args.batch else "")
                         + (f" --model {args.model}" if args.model else ""))
    print_bench(report, console)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        console.print(f"wrote {args.json}")
    ok = report["items"] == args.requests and report["errors"] == 0
    return 0 if ok else 1


def add_summarize_bench(kinds: Any) -> None:
    p = kinds.add_parser("summarize", help="backfill requests with repeats: dedupe + packing + batch savings")
    p.add_argument("--items", required=True, help="CSV / JSON lines / Parquet file of items")
    p.add_argument("--text-col", required=True)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--distinct", type=int, default=200, help="use the first N distinct non-empty texts")
    p.add_argument("--batch", action="store_true", help="give the job a 24 h deadline (simulated batch API)")
    p.add_argument("--model", help="pin the model, which is then also the baseline (no routing saving)")
    p.add_argument("--latency-scale", type=float, default=0.05, help="scale of simulated provider latency")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--encoding", type=text_encoding, help="file encoding (default: UTF-8, falling back to cp1252)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.set_defaults(func=cmd_bench_summarize)
