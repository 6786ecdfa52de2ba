"""`frugalstream bench pipeline`: the full request flow at a fixed rate on the embedded broker.

Every service runs in this process (as in the demo) with the real MiniLM embedder and the simulated
provider; the demo workload is replayed in a cycle with fresh ids. Reported: throughput; end-to-end latency
p50/p99 of cache hits and misses, as the caller sees it (to the answer reaching the reader); the overhead
frugalstream adds to a miss (end-to-end minus the provider call), split into time inside the services (their
trace spans, `tools.bench.inside`) and outside them (the broker's fetch waits on four hops, queueing before a
batch starts: Tansu's fetch wait dominates it); consumer lag sampled each second (requests produced minus the
classifier group's committed offsets: Tansu's end offsets are wrong, so we count what we produced); and each
stage's per-batch process and publish-and-ack time. Latency figures are of interactive requests; the
workload's requests that can wait go into provider batch jobs on purpose and are reported apart (`deferred_*`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from rich.console import Console
from rich.table import Table

from frugalstream.gateway.deferred import may_wait
from frugalstream.runtime.logging import configure_logging
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.tools.bench.embed import demo_lookup_texts
from frugalstream.tools.bench.inside import ANSWER_PATH, STEPS, inside_ms, span_recorder, steps_ms
from frugalstream.tools.bench.loop_watch import loop_watch
from frugalstream.tools.demo_workload import load_demo_workload
from frugalstream.tools.local_cluster import local_cluster, run_services

SERVICES = ("classifier", "dedupe", "gateway", "accountant")
HITS = ("cache_exact", "cache_semantic", "coalesced")
MAX_DRAIN_S = 5.0  # a step whose last answers come later than this after its last request is not sustained
MIN_OFFERED = 0.9  # a step whose requests went out slower than this share of its rate did not test it
DEFAULT_RAMP = "25,50,75,100,125,150,175,200,250,300,400"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)


class Run:
    """Produces at a fixed rate, reads answers, samples lag; all timestamps are wall clock seconds."""

    def __init__(self, bootstrap: str, settings: Any, workload: list[LLMRequest], partitions: int) -> None:
        self.bootstrap, self.settings, self.workload, self.partitions = bootstrap, settings, workload, partitions
        self.produced = 0
        self.answers: dict[str, LLMResponse] = {}
        self.received: dict[str, float] = {}  # request id -> when its first answer reached the reader (wall clock)
        self.lag: list[tuple[float, int, int]] = []  # (t, classifier lag, produced - answered)
        self.fetch_wait_ms = 50

    def request_id(self, n: int) -> str:
        return f"b{n}-{self.workload[n % len(self.workload)].id}"

    def request(self, n: int) -> LLMRequest:
        base = self.workload[n % len(self.workload)]
        return base.model_copy(update={"id": self.request_id(n), "created_at": time.time()})

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
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    fetch_max_wait_ms=self.fetch_wait_ms)
        await consumer.start()
        try:
            while not stop.is_set():
                for records in (await consumer.getmany(timeout_ms=200, max_records=2000)).values():
                    for rec in records:
                        resp = LLMResponse.model_validate_json(rec.value)
                        self.answers.setdefault(resp.request_id, resp)
                        self.received.setdefault(resp.request_id, time.time())
        finally:
            await consumer.stop()

    async def sample_lag(self, stop: asyncio.Event) -> None:
        # OffsetFetch from outside the group (a consumer that never subscribes does not join it).
        probe = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.settings.group("classifier"),
                                 enable_auto_commit=False)
        await probe.start()
        topic = self.settings.topic(t.REQUESTS)
        started = time.monotonic()
        try:
            while not stop.is_set():
                offsets = [await probe.committed(TopicPartition(topic, p)) for p in range(self.partitions)]
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


@contextlib.asynccontextmanager
async def running_pipeline(latency_scale: float, warmup: int, fetch_wait_ms: int | None = None) -> AsyncIterator[Run]:
    """Broker and services up, the warm-up answered (model load, group joins); yields the load driver.

    `fetch_wait_ms` lowers the consumers' fetch wait: the embedded broker answers a waiting fetch only when it
    times out, so each hop otherwise adds up to 50 ms that a real Kafka broker does not.
    """
    from frugalstream.tools.demo import demo_settings

    def settings(bootstrap: str, state_dir: Path) -> Any:
        base = demo_settings(bootstrap, state_dir, latency_scale=latency_scale)
        return base if fetch_wait_ms is None else base.model_copy(update={"kafka_fetch_max_wait_ms": fetch_wait_ms})

    workload = load_demo_workload()
    async with (
        local_cluster(settings) as cluster,
        run_services(cluster.settings, SERVICES),
    ):
        run = Run(cluster.bootstrap, cluster.settings, workload, cluster.partitions)
        run.fetch_wait_ms = cluster.settings.kafka_fetch_max_wait_ms
        stop = asyncio.Event()
        reader = asyncio.create_task(run.read(stop))
        try:
            await run.produce(rate=20.0, duration_s=warmup / 20.0)
            await run.wait_answered(120)
            yield run
        finally:
            stop.set()
            await reader


async def measure_step(run: Run, rate: float, duration_s: float, drain_timeout_s: float) -> dict[str, Any]:
    """One fixed-rate step after whatever ran before; only this step's requests and stage timings count."""
    from frugalstream.runtime.metrics import METRICS

    before = set(run.answers)
    first = run.produced
    for stats in METRICS.stages.values():
        stats.reset()
    run.lag = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(run.sample_lag(stop))
    started = time.monotonic()
    async with loop_watch() as watch:
        await run.produce(rate, duration_s, start_n=first)
        produce_s = time.monotonic() - started
        await run.wait_answered(drain_timeout_s)
        drain_s = time.monotonic() - started - produce_s
    stop.set()
    await sampler
    ids = {run.request_id(n) for n in range(first, run.produced)}
    can_wait = {run.request_id(n) for n in range(first, run.produced) if may_wait(run.request(n))}
    measured = [r for rid, r in run.answers.items() if rid not in before and rid in ids]
    return {**report(rate, duration_s, produce_s, drain_s, run, measured, requests=run.produced - first,
                     can_wait=can_wait), **watch.report()}


async def run_pipeline_bench(rate: float, duration_s: float, *, latency_scale: float = 0.05,
                             warmup: int = 30, fetch_wait_ms: int | None = None) -> dict[str, Any]:
    """One fixed-rate step, with the services' trace spans recorded: the time inside them is reported apart
    from the end-to-end figures, which on the embedded broker hold its fetch waits (`tools.bench.inside`)."""
    with span_recorder() as spans:
        async with running_pipeline(latency_scale, warmup, fetch_wait_ms) as run:
            spans.clear()
            rep = await measure_step(run, rate, duration_s, drain_timeout_s=60)
            rep["fetch_wait_ms"] = run.fetch_wait_ms
            topic_of = {run.settings.topic(name): name for name in ANSWER_PATH}
            inside = inside_ms(spans, topic_of)
            overheads = rep.pop("miss_overheads")
            misses = [inside[rid] for rid in rep.pop("miss_ids") if rid in inside]
            outside = [overheads[rid] - inside[rid] for rid in overheads if rid in inside]
            rep["miss_inside_ms_p50"], rep["miss_inside_ms_p99"] = pct(misses, 0.5), pct(misses, 0.99)
            rep["miss_outside_ms_p50"], rep["miss_outside_ms_p99"] = pct(outside, 0.5), pct(outside, 0.99)
            rep["miss_inside_measured"] = len(misses)
            created = {rid: r.created_at for rid, r in run.answers.items() if rid in overheads and r.created_at}
            rep["miss_steps_ms"] = {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99)}
                                    for name, v in steps_ms(spans, topic_of, created).items()}
            return rep


def sustained(step: dict[str, Any]) -> bool:
    """Every request answered without error, drained promptly, the backlog not growing during the step, and
    the rate really offered: the load generator shares the process, and a step it could not produce at its
    nominal rate did not test that rate."""
    backlog = [x[2] for x in step["lag_samples"]]
    quarter = max(1, len(backlog) // 4)
    growing = bool(backlog) and statistics.mean(backlog[-quarter:]) > 2 * statistics.mean(backlog[:quarter]) + \
        step["rate_rps"]
    return (step["answered"] == step["requests"] and step["errors"] == 0 and step["drain_s"] <= MAX_DRAIN_S
            and not growing and step["offered_rps"] >= MIN_OFFERED * step["rate_rps"])


async def find_max(rates: list[float], step_s: float, *, latency_scale: float, warmup: int,
                   fetch_wait_ms: int | None = None, console: Console | None = None) -> dict[str, Any]:
    """Ramps through `rates` on one running pipeline; stops at the first rate it cannot sustain."""
    steps: list[dict[str, Any]] = []
    best = 0.0
    async with running_pipeline(latency_scale, warmup, fetch_wait_ms) as run:
        for rate in rates:
            step = await measure_step(run, rate, step_s, drain_timeout_s=30)
            step.pop("miss_ids")
            step.pop("miss_overheads")
            step["sustained"] = sustained(step)
            steps.append(step)
            if console is not None:
                console.print(f"{rate:>6.0f} req/s (offered {step['offered_rps']}): answered "
                              f"{step['answered']}/{step['requests']}, errors "
                              f"{step['errors']}, drain {step['drain_s']} s, throughput {step['throughput_rps']}, "
                              f"{'sustained' if step['sustained'] else 'NOT sustained'}")
            if not step["sustained"]:
                break
            best = rate
    return {"max_sustained_rps": best, "step_s": step_s, "steps": steps}


def embedder_rate(texts: list[str], batch: int = 16) -> float:
    """The production embedder (settings' precision, length, threads) on these texts, the text LRU bypassed."""
    from frugalstream.resources import build_embedder
    from frugalstream.runtime.settings import Settings
    from frugalstream.tools.bench.embed import rate

    embedder = build_embedder(Settings())
    return rate(embedder, texts, batch)[0]  # type: ignore[arg-type]


def report(rate: float, duration_s: float, produce_s: float, drain_s: float, run: Run,
           measured: list[LLMResponse], *, requests: int, can_wait: set[str] | frozenset[str] = frozenset()
           ) -> dict[str, Any]:
    """Latency is the caller's: from the request's `created_at` to its answer reaching the reader (the
    gateway's `responded_at` is earlier: the answer is still to be published and fetched). Latency figures are
    of interactive requests: those that can wait (`can_wait`: a latency class or a deadline) are held for a
    provider batch job on purpose, so their time is reported apart (`deferred_*`)."""
    from frugalstream.runtime.metrics import METRICS

    received: dict[str, float] = getattr(run, "received", {})

    def e2e(r: LLMResponse) -> float:
        return (received.get(r.request_id, r.responded_at) - (r.created_at or 0)) * 1000

    deferred = [e2e(r) for r in measured if r.request_id in can_wait and r.source != "error"]
    interactive = [r for r in measured if r.request_id not in can_wait]
    hits = [e2e(r) for r in interactive if r.source in HITS]
    misses = [r for r in interactive if r.source == "llm"]
    overheads = {r.request_id: e2e(r) - (r.provider_latency_ms or 0.0) for r in misses}
    overhead = list(overheads.values())
    lag = [x[1] for x in run.lag]
    quarter = max(1, len(lag) // 4)
    inside = {name: {"records": s.records, "batches": s.batches,
                     "process_ms_per_record": round(s.process_s * 1000 / max(1, s.records), 2),
                     "publish_ms_per_batch": round(s.publish_s * 1000 / max(1, s.batches), 2)}
              for name, s in METRICS.stages.items() if s.records}
    return {
        "rate_rps": rate, "duration_s": duration_s, "requests": requests, "answered": len(measured),
        "errors": sum(1 for r in measured if r.source == "error"),
        "offered_rps": round(requests / produce_s, 2) if produce_s > 0 else 0.0,
        "throughput_rps": round(len(measured) / (produce_s + drain_s), 2), "drain_s": round(drain_s, 2),
        "hits": len(hits), "misses": len(misses),
        "hit_e2e_ms_p50": pct(hits, 0.5), "hit_e2e_ms_p99": pct(hits, 0.99),
        "miss_e2e_ms_p50": pct([e2e(r) for r in misses], 0.5), "miss_e2e_ms_p99": pct([e2e(r) for r in misses], 0.99),
        "miss_overhead_ms_p50": pct(overhead, 0.5), "miss_overhead_ms_p99": pct(overhead, 0.99),
        "provider_ms_p50": pct([r.provider_latency_ms or 0.0 for r in misses], 0.5),
        "deferred": len(deferred), "deferred_e2e_ms_p50": pct(deferred, 0.5),
        "deferred_e2e_ms_p99": pct(deferred, 0.99),
        "classifier_lag_max": max(lag, default=0),
        "classifier_lag_first_quarter_mean": round(statistics.mean(lag[:quarter]), 1) if lag else 0,
        "classifier_lag_last_quarter_mean": round(statistics.mean(lag[-quarter:]), 1) if lag else 0,
        "lag_samples": run.lag, "inside_services": inside, "miss_ids": [r.request_id for r in misses],
        "miss_overheads": overheads,
    }


def print_report(rep: dict[str, Any], console: Console) -> None:
    table = Table(title=f"frugalstream bench pipeline: {rep['rate_rps']} req/s for {rep['duration_s']} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("answered", "errors", "throughput_rps", "drain_s", "hits", "misses", "hit_e2e_ms_p50",
                "hit_e2e_ms_p99", "miss_e2e_ms_p50", "miss_e2e_ms_p99", "provider_ms_p50", "miss_overhead_ms_p50",
                "miss_overhead_ms_p99", "miss_inside_ms_p50", "miss_inside_ms_p99", "miss_outside_ms_p50",
                "miss_outside_ms_p99", "deferred", "deferred_e2e_ms_p50", "deferred_e2e_ms_p99", "classifier_lag_max",
                "classifier_lag_first_quarter_mean",
                "classifier_lag_last_quarter_mean", "loop_stall_ms_p99", "loop_stall_ms_max", "loop_stalls_over_20ms",
                "gc_full_collections", "gc_full_ms_max"):
        table.add_row(key, str(rep[key]))
    table.add_section()
    for name in STEPS if "miss_steps_ms" in rep else ():
        step = rep["miss_steps_ms"][name]
        table.add_row(f"miss, {name}: p50 / p99 ms", f"{step['p50']} / {step['p99']}")
    table.add_section()
    for name, s in rep["inside_services"].items():
        table.add_row(f"{name}: process ms/record, publish ms/batch",
                      f"{s['process_ms_per_record']} / {s['publish_ms_per_batch']}")
    console.print(table)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    configure_logging("WARNING", fmt="console")
    console = Console()
    if args.find_max:
        rates = [float(x) for x in args.ramp.split(",")]
        rep = asyncio.run(find_max(rates, args.step_duration, latency_scale=args.latency_scale, warmup=30,
                                   fetch_wait_ms=args.fetch_wait_ms, console=console))
        texts = demo_lookup_texts()
        rep["embedder_texts_per_s"] = round(embedder_rate(texts), 1)
        rep["max_over_embedder"] = round(rep["max_sustained_rps"] / rep["embedder_texts_per_s"], 2)
        console.print(f"max_sustained_rps {rep['max_sustained_rps']}, embedder_texts_per_s "
                      f"{rep['embedder_texts_per_s']} (ratio {rep['max_over_embedder']})")
        ok = rep["max_sustained_rps"] > 0
    else:
        rep = asyncio.run(run_pipeline_bench(args.rate, args.duration, latency_scale=args.latency_scale,
                                             fetch_wait_ms=args.fetch_wait_ms))
        print_report(rep, console)
        ok = rep["answered"] == rep["requests"] and rep["errors"] == 0
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0 if ok else 1


def add_pipeline_bench(kinds: Any) -> None:
    p = kinds.add_parser("pipeline", help="full flow at a fixed rate: throughput, latency, lag, overhead")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load after the warm-up")
    p.add_argument("--latency-scale", type=float, default=0.05, help="scale of simulated provider latency")
    p.add_argument("--find-max", action="store_true",
                   help="ramp the rate (--ramp) and report max_sustained_rps and embedder_texts_per_s")
    p.add_argument("--ramp", default=DEFAULT_RAMP, help="comma-separated rates for --find-max")
    p.add_argument("--step-duration", type=float, default=20.0, help="seconds per rate with --find-max")
    p.add_argument("--fetch-wait-ms", type=int,
                   help="consumers' fetch wait on the embedded broker (default: the local cluster's 50 ms)")
    p.add_argument("--json", help="also write the report as JSON to this path")
    p.set_defaults(func=cmd_bench_pipeline)
