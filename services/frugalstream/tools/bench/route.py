"""`frugalstream bench route`: the shipped router scored like RouteLLM, next to a random router.

Every prompt is embedded with the production embedder and scored with the shipped router; the threshold
sweep sends the top-k scores to the strong model. Rows the router was trained on are never scored: on the
public data it was trained with, only the held-out hash half is used, with the router variant that never
saw it (`route_eval.honest_router_and_mask`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from frugalstream.tools.bench.models import add_model_arguments


def run(args: argparse.Namespace) -> dict[str, Any]:
    from frugalstream.llm.embedder import MiniLMEmbedder
    from frugalstream.tools.evals.route_eval import (
        find_contaminated_files,
        honest_router_and_mask,
        load_contaminated,
        load_route_csv,
        run_route_bench,
    )

    path = Path(args.dataset)
    contaminated = load_contaminated(find_contaminated_files(path))
    rows = load_route_csv(path, args.prompt_col, args.weak_col, args.strong_col, contaminated)
    router, mask, note = honest_router_and_mask([r[0] for r in rows])
    scored = [r for r, keep in zip(rows, mask, strict=True) if keep]
    started = time.perf_counter()
    vectors = MiniLMEmbedder(precision=args.precision, max_seq_tokens=args.max_tokens).embed([r[0] for r in scored])
    embed_s = time.perf_counter() - started
    latencies = []
    for v, row in zip(vectors[: min(len(vectors), 2000)], scored, strict=False):
        t0 = time.perf_counter()
        router.score(v.reshape(1, -1), [row[0]])
        latencies.append((time.perf_counter() - t0) * 1000)
    latencies.sort()
    result = run_route_bench(scored, router.score(vectors, [r[0] for r in scored]))
    result.update(
        dataset=str(path), rows_total=len(rows), rows_scored=len(scored), contaminated_excluded=len(contaminated),
        split=note, cost_reduction_at_95=1 - result["strong_share_at_95"],
        random_cost_reduction_at_95=1 - result["random_strong_share_at_95"], embed_s=round(embed_s, 1),
        model_precision=args.precision, max_tokens=args.max_tokens,
        score_ms_p50=latencies[len(latencies) // 2], score_ms_p99=latencies[int(len(latencies) * 0.99)],
    )
    return result


def cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    result = run(args)
    name = Path(result["dataset"]).name
    table = Table(title=f"bench route: {name} ({result['rows_scored']} rows, {result['split']})")
    for col in ("router", "apgr", "strong share at 95%", "cost_reduction_at_95"):
        table.add_column(col, justify="left" if col == "router" else "right")
    table.add_row("shipped", f"{result['apgr']:.3f}", f"{result['strong_share_at_95']:.3f}",
                  f"{result['cost_reduction_at_95']:.3f}")
    table.add_row("random", f"{result['random_apgr']:.3f}", f"{result['random_strong_share_at_95']:.3f}",
                  f"{result['random_cost_reduction_at_95']:.3f}")
    Console().print(table)
    Console().print(f"score latency on top of the embedding: p50 {result['score_ms_p50']:.3f} ms, "
                    f"p99 {result['score_ms_p99']:.3f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return 0


def _jsonable(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else str(value)


def add_route_bench(kinds: Any) -> None:
    p = kinds.add_parser("route", help="RouteLLM-style routing bench (APGR, cost reduction at 95%%)")
    p.add_argument("--dataset", required=True, help="CSV with a prompt and per-model correctness columns")
    p.add_argument("--prompt-col", default="prompt")
    p.add_argument("--weak-col", required=True, help="True/False: did the cheap model answer correctly")
    p.add_argument("--strong-col", required=True, help="True/False: did the strong model answer correctly")
    add_model_arguments(p)
    p.add_argument("--json", help="write the result as JSON")
    p.set_defaults(func=cmd)
