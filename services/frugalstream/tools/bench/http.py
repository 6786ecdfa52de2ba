"""`frugalstream bench http`: what the OpenAI-compatible HTTP entry adds, on a cache hit and on a miss.

The same requests, at a fixed rate, go three ways: straight to the simulated provider (no frugalstream),
through the pipeline with the Kafka client (`FrugalClient.ask`), and through the HTTP entry (httpx, as the
openai SDK sends them). The entry's overhead is the HTTP column minus the client column; its own time per
call (parse, checks, pricing; from its `Server-Timing` header) is reported apart. Everything runs on the
embedded broker, whose fetch wait (50 ms, answered late) is in both pipeline columns and cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

KEY, TENANT = "bench-key", "bench"
PATHS = ("provider", "client", "http")


def _stats(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return {"n": len(ms), "p50_ms": round(pick(0.5), 2), "p90_ms": round(pick(0.9), 2),
            "p99_ms": round(pick(0.99), 2), "mean_ms": round(statistics.fmean(ms), 2)}


async def _at_rate(rate: float, count: int, call: Callable[[int], Awaitable[float]]) -> list[float]:
    start = time.perf_counter()

    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        return await call(i)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def run(rate: float, duration: float, latency_scale: float) -> dict[str, Any]:
    import httpx

    from frugalstream.client import FrugalClient
    from frugalstream.http_entry.server import http_entry
    from frugalstream.llm.providers.simulated import SimulatedProvider
    from frugalstream.schemas import ChatMessage
    from frugalstream.tools.local_cluster import cluster_settings, local_cluster, run_services

    def settings(bootstrap: str, state_dir: Path) -> Any:
        return cluster_settings(bootstrap, state_dir, simulated_latency_scale=latency_scale, log_level="WARNING",
                                http_api_keys=SecretStr(json.dumps({KEY: TENANT})))

    count = max(1, round(rate * duration))
    run_id = uuid.uuid4().hex[:6]
    sources: dict[str, Counter[str]] = {}
    entry_ms: dict[str, list[float]] = {}
    async with local_cluster(settings) as cluster, run_services(cluster.settings), \
            http_entry(cluster.settings, port=0) as running, \
            FrugalClient(TENANT, settings=cluster.settings, client_id="bench-http-client") as client, \
            httpx.AsyncClient(base_url=running.url, headers={"authorization": f"Bearer {KEY}"},
                              timeout=120, limits=httpx.Limits(max_connections=200)) as web:
        provider = SimulatedProvider(latency_scale=latency_scale)

        def text(scenario: str, path: str, i: int) -> str:
            if scenario == "hit":
                return "What are your customer support hours on weekends?"
            return f"How do I set up export number {i} ({path} {run_id}) to a new region?"

        async def call(scenario: str, path: str, i: int) -> float:
            question = text(scenario, path, i)
            t0 = time.perf_counter()
            if path == "provider":
                await provider.complete(model="gpt-4o-mini", messages=(ChatMessage(role="user", content=question),),
                                        sampling=provider_sampling)
                source = "provider"
            elif path == "client":
                source = (await client.complete(question)).source
            else:
                r = await web.post("/v1/chat/completions", json={
                    "model": "auto", "messages": [{"role": "user", "content": question}]})
                source = r.headers.get("x-frugal-source", f"http_{r.status_code}")
                timing = dict(p.split(";dur=") for p in r.headers.get("server-timing", "").split(", ") if p)
                if "entry" in timing:
                    entry_ms.setdefault(scenario, []).append(float(timing["entry"]))
            elapsed = (time.perf_counter() - t0) * 1000
            sources.setdefault(f"{scenario}/{path}", Counter())[source] += 1
            return elapsed

        from frugalstream.schemas import SamplingParams

        provider_sampling = SamplingParams()
        for path in PATHS:  # warm-up: connections, models, and the hit question's cache entry
            await call("hit", path, 0)
            await call("miss", path, -1)
        await asyncio.sleep(1.0)
        sources.clear()
        entry_ms.clear()
        results: dict[str, Any] = {}
        for scenario in ("miss", "hit"):
            for path in PATHS:
                def one(i: int, s: str = scenario, p: str = path) -> Awaitable[float]:
                    return call(s, p, i)

                results[f"{scenario}/{path}"] = _stats(await _at_rate(rate, count, one))
    report: dict[str, Any] = {"rate": rate, "duration_s": duration, "latency_scale": latency_scale,
                              "requests_per_cell": count, "cells": results,
                              "sources": {k: dict(v) for k, v in sources.items()},
                              "entry_own_ms": {k: _stats(v) for k, v in entry_ms.items()}}
    for scenario in ("miss", "hit"):
        http, direct = results[f"{scenario}/http"], results[f"{scenario}/client"]
        report[f"{scenario}_http_overhead_ms"] = {q: round(http[q] - direct[q], 2) for q in ("p50_ms", "p99_ms",
                                                                                            "mean_ms")}
    return report


def cmd_bench_http(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from frugalstream.runtime.logging import configure_logging

    configure_logging("WARNING", fmt="console")
    report = asyncio.run(run(args.rate, args.duration, args.latency_scale))
    table = Table(title=f"bench http: {report['requests_per_cell']} requests per cell at {args.rate:g}/s "
                        f"(simulated provider, latency scale {args.latency_scale:g})")
    for col in ("case", "path", "p50 ms", "p90 ms", "p99 ms", "mean ms", "sources"):
        table.add_column(col, justify="left" if col in ("case", "path", "sources") else "right")
    for cell, s in report["cells"].items():
        scenario, path = cell.split("/")
        table.add_row(scenario, path, f"{s['p50_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['p99_ms']:.1f}",
                      f"{s['mean_ms']:.1f}", ", ".join(f"{k}={v}" for k, v in report["sources"][cell].items()))
    console = Console()
    console.print(table)
    for scenario in ("miss", "hit"):
        over, own = report[f"{scenario}_http_overhead_ms"], report["entry_own_ms"].get(scenario, {})
        console.print(f"{scenario}: HTTP entry adds p50 {over['p50_ms']:+.1f} ms, p99 {over['p99_ms']:+.1f} ms, "
                      f"mean {over['mean_ms']:+.1f} ms over the Kafka client; its own time per call p50 "
                      f"{own.get('p50_ms', 0):.2f} ms, p99 {own.get('p99_ms', 0):.2f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def add_http_bench(kinds: Any) -> None:
    p = kinds.add_parser("http", help="the HTTP entry's overhead on a cache hit and a miss, next to the provider")
    p.add_argument("--rate", type=float, default=5.0, help="requests per second per cell")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    p.add_argument("--latency-scale", type=float, default=0.05, help="scale of simulated provider latency")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.set_defaults(func=cmd_bench_http)
