"""`frugalstream bench pipeline`: the full request flow at a fixed rate on the embedded broker.

Every service runs in this process (as in the demo) with the real MiniLM embedder and the simulated
provider; the demo workload is replayed in a cycle with fresh ids. Reported: throughput, end-to-end latency
p50/p99 for cache hits and misses, the overhead frugalstream adds to a miss (end-to-end minus the provider
call), consumer lag sampled each second (requests produced minus the classifier group's committed offsets:
Tansu's end offsets are wrong, so we count what we produced), and time inside the services (per-batch
process vs publish-and-ack) apart from the rest, which is the broker's (Tansu's fetch wait dominates it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from frugalstream.runtime.logging import configure_logging
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.tools.demo_workload import load_demo_workload
from frugalstream.tools.local_cluster import local_cluster, run_services

SERVICES = ("classifier", "dedupe", "gateway", "accountant")
HITS = ("cache_exact", "cache_semantic", "coalesced")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


class Run:
    """Produces at a fixed rate, reads answers, samples lag; all timestamps are wall clock seconds."""

    def __init__(self, bootstrap: str, settings: Any, workload: list[LLMRequest]) -> None:
        self.bootstrap, self.settings, self.workload = bootstrap, settings, workload
        self.produced = 0
        self.answers: dict[str, LLMResponse] = {}
        self.lag: list[tuple[float, int, int]] = []  # (t, classifier lag, produced - answered)

    def request(self, n: int) -> LLMRequest:
        base = self.workload[n % len(self.workload)]
        return base.model_copy(update={"id": f"b{n}-{base.id}", "created_at": time.time()})

    async def produce(self, rate: float, duration_s: float, start_n: int = 0) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=False, linger_ms=2)
        await producer.start()
        try:
            start = time.monotonic()
            for i in range(int(rate * duration_s)):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                req = self.request(start_n + i)
                await producer.send(self.settings.topic(t.REQUESTS), req.model_dump_json().encode(),
                                    key=req.id.encode())
                self.produced += 1
            await producer.flush()
        finally:
            await producer.stop()

    async def read(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(self.settings.topic(t.RESPONSES), bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50)
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=200, max_records=2000)).values():
                    for rec in records:
                        resp = LLMResponse.model_validate_json(rec.value)
                        self.answers.setdefault(resp.request_id, resp)
        finally:
            await consumer.stop()

    async def sample_lag(self, stop: asyncio.Event, partitions: int) -> None:
        # OffsetFetch from outside the group (a consumer that never subscribes does not join it).
        probe = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.settings.group("classifier"),
                                 enable_auto_commit=False)
        await probe.start()
        topic = self.settings.topic(t.REQUESTS)
        started = time.monotonic()
        try:
            while not stop.is_set():
                offsets = [await probe.committed(TopicPartition(topic, p)) for p in range(partitions)]
                committed = sum(o for o in offsets if o)
                self.lag.append((round(time.monotonic() - started, 1), self.produced - committed,
                                 self.produced - len(self.answers)))
                await asyncio.sleep(1.0)
        finally:
            await probe.stop()

    async def wait_answered(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.answers) < self.produced and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.1)


async def run_pipeline_bench(rate: float, duration_s: float, *, latency_scale: float = 0.05,
                             warmup: int = 30) -> dict[str, Any]:
    from frugalstream.runtime.metrics import METRICS
    from frugalstream.tools.demo import demo_settings

    workload = load_demo_workload()
    async with (
        local_cluster(partial(demo_settings, latency_scale=latency_scale)) as cluster,
        run_services(cluster.settings, SERVICES),
    ):
        run = Run(cluster.bootstrap, cluster.settings, workload)
        stop = asyncio.Event()
        reader = asyncio.create_task(run.read(stop))
        await run.produce(rate=20.0, duration_s=warmup / 20.0)  # model load, group joins, warm cache
        await run.wait_answered(120)
        warm_ids = set(run.answers)
        for stats in METRICS.stages.values():  # the warm-up is not measured
            stats.reset()
        sampler = asyncio.create_task(run.sample_lag(stop, cluster.partitions))
        started = time.monotonic()
        await run.produce(rate, duration_s, start_n=warmup)
        produce_s = time.monotonic() - started
        await run.wait_answered(60)
        drain_s = time.monotonic() - started - produce_s
        stop.set()
        await asyncio.gather(reader, sampler)
    measured = [r for rid, r in run.answers.items() if rid not in warm_ids]
    return report(rate, duration_s, produce_s, drain_s, run, measured)


def report(rate: float, duration_s: float, produce_s: float, drain_s: float, run: Run,
           measured: list[LLMResponse]) -> dict[str, Any]:
    from frugalstream.runtime.metrics import METRICS

    def e2e(r: LLMResponse) -> float:
        return ((r.responded_at or 0) - (r.created_at or 0)) * 1000

    hits = [e2e(r) for r in measured if r.source in HITS]
    misses = [r for r in measured if r.source == "llm"]
    overhead = [e2e(r) - (r.provider_latency_ms or 0.0) for r in misses]
    lag = [x[1] for x in run.lag]
    quarter = max(1, len(lag) // 4)
    inside = {name: {"records": s.records, "batches": s.batches,
                     "process_ms_per_record": round(s.process_s * 1000 / max(1, s.records), 2),
                     "publish_ms_per_batch": round(s.publish_s * 1000 / max(1, s.batches), 2)}
              for name, s in METRICS.stages.items() if s.records}
    return {
        "rate_rps": rate, "duration_s": duration_s, "requests": int(rate * duration_s), "answered": len(measured),
        "errors": sum(1 for r in measured if r.source == "error"),
        "throughput_rps": round(len(measured) / (produce_s + drain_s), 2), "drain_s": round(drain_s, 2),
        "hits": len(hits), "misses": len(misses),
        "hit_e2e_ms_p50": pct(hits, 0.5), "hit_e2e_ms_p99": pct(hits, 0.99),
        "miss_e2e_ms_p50": pct([e2e(r) for r in misses], 0.5), "miss_e2e_ms_p99": pct([e2e(r) for r in misses], 0.99),
        "miss_overhead_ms_p50": pct(overhead, 0.5), "miss_overhead_ms_p99": pct(overhead, 0.99),
        "provider_ms_p50": pct([r.provider_latency_ms or 0.0 for r in misses], 0.5),
        "classifier_lag_max": max(lag, default=0),
        "classifier_lag_first_quarter_mean": round(statistics.mean(lag[:quarter]), 1) if lag else 0,
        "classifier_lag_last_quarter_mean": round(statistics.mean(lag[-quarter:]), 1) if lag else 0,
        "lag_samples": run.lag, "inside_services": inside,
    }


def print_report(rep: dict[str, Any], console: Console) -> None:
    table = Table(title=f"frugalstream bench pipeline: {rep['rate_rps']} req/s for {rep['duration_s']} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("answered", "errors", "throughput_rps", "drain_s", "hits", "misses", "hit_e2e_ms_p50",
                "hit_e2e_ms_p99", "miss_e2e_ms_p50", "miss_e2e_ms_p99", "provider_ms_p50", "miss_overhead_ms_p50",
                "miss_overhead_ms_p99", "classifier_lag_max", "classifier_lag_first_quarter_mean",
                "classifier_lag_last_quarter_mean"):
        table.add_row(key, str(rep[key]))
    table.add_section()
    for name, s in rep["inside_services"].items():
        table.add_row(f"{name}: process ms/record, publish ms/batch",
                      f"{s['process_ms_per_record']} / {s['publish_ms_per_batch']}")
    console.print(table)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    configure_logging("WARNING", fmt="console")
    rep = asyncio.run(run_pipeline_bench(args.rate, args.duration, latency_scale=args.latency_scale))
    print_report(rep, Console())
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0 if rep["answered"] == rep["requests"] and rep["errors"] == 0 else 1


def add_pipeline_bench(kinds: Any) -> None:
    p = kinds.add_parser("pipeline", help="full flow at a fixed rate: throughput, latency, lag, overhead")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load after the warm-up")
    p.add_argument("--latency-scale", type=float, default=0.05, help="scale of simulated provider latency")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.set_defaults(func=cmd_bench_pipeline)
