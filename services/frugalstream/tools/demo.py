"""`frugalstream demo`: an embedded broker, every service in one process, the bundled workload, the report.

The run's state (the accountant's ledger above all) is kept in a state dir (`.frugalstream-demo` by default,
never `FRUGAL_STATE_DIR`, which may be a real deployment's), so `frugalstream report` can show the run after
the demo ends. Each run starts that dir afresh, and only a dir an earlier demo marked as its own is emptied.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress

from frugalstream.accountant.app import AccountantService
from frugalstream.gateway.deferred import answer_by, may_wait
from frugalstream.runtime.settings import Settings, UsageError
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.tools.demo_workload import load_demo_workload, workload_mix
from frugalstream.tools.local_cluster import cluster_settings, local_cluster, run_services

DEFAULT_STATE_DIR = Path(".frugalstream-demo")
#: Batch jobs at demo speed: gathered for a second, completed by the simulated provider after two, polled
#: twice a second (a real provider takes minutes to hours; the deadlines are the workload's own).
DEMO_BATCHES: dict[str, Any] = {"batch_gather_s": 1.0, "batch_poll_interval_s": 0.5, "simulated_batch_delay_s": 2.0}
MARKER = ".frugalstream-demo"


def prepare_state_dir(path: Path) -> Path:
    """An empty state dir for this run, marked as the demo's; a non-empty dir without the mark is refused (it
    may be someone's data), one with the mark is the previous run and is removed."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"demo --state-dir {path}: is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise UsageError(f"demo --state-dir {path}: not empty and not an earlier demo's state dir (no {MARKER} "
                             "file); choose another directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("state of `frugalstream demo`; the next demo run replaces this directory\n")
    return path


def report_command(state_dir: Path) -> str:
    """The exact command that shows the run's ledger."""
    db, out = state_dir / "ledger.sqlite", state_dir / "report.html"
    return f"frugalstream report --db {shlex.quote(str(db))} --format html --out {shlex.quote(str(out))}"


def demo_settings(bootstrap: str, state_dir: Path, latency_scale: float) -> Settings:
    """The local cluster's settings with the simulated provider, whatever the environment configures."""
    return cluster_settings(bootstrap, state_dir, provider="simulated", simulated_latency_scale=latency_scale,
                            log_level="WARNING", **DEMO_BATCHES)


async def produce(bootstrap: str, settings: Settings, requests: list[LLMRequest], rate: float | None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=5, acks="all")
    await producer.start()
    try:
        start = time.monotonic()
        for i, req in enumerate(requests):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            stamped = req.model_copy(update={"created_at": time.time()})
            await producer.send(settings.topic(t.REQUESTS), stamped.model_dump_json().encode(), key=req.id.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def collect_responses(bootstrap: str, settings: Settings, ids: set[str], timeout_s: float,
                            progress: Progress | None = None) -> dict[str, list[LLMResponse]]:
    """Reads `llm.responses` from the start until every id has an answer (or the timeout passes)."""
    consumer = AIOKafkaConsumer(settings.topic(t.RESPONSES), bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
    await consumer.start()
    got: dict[str, list[LLMResponse]] = {}
    task = progress.add_task("responses", total=len(ids)) if progress else None
    deadline = time.monotonic() + timeout_s
    try:
        while set(got) < ids and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            for records in batch.values():
                for rec in records:
                    try:
                        resp = LLMResponse.model_validate_json(rec.value)
                    except ValidationError:
                        continue  # someone else's bad message; the dedupe service dead-letters it
                    if resp.request_id in ids:
                        got.setdefault(resp.request_id, []).append(resp)
            if progress is not None and task is not None:
                progress.update(task, completed=len(got))
    finally:
        await consumer.stop()
    return got


async def wait_priced(accountant: AccountantService, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while accountant.priced < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter, not an event
        await asyncio.sleep(0.1)


async def run_demo(*, limit: int | None = None, rate: float | None = 100.0, latency_scale: float = 0.05,
                   timeout_s: float = 600.0, console: Console | None = None,
                   state_dir: Path = DEFAULT_STATE_DIR) -> dict[str, Any]:
    console = console or Console(stderr=True)
    requests = load_demo_workload()[:limit] if limit else load_demo_workload()
    ids = {r.id for r in requests}
    prepare_state_dir(state_dir)
    async with local_cluster(partial(demo_settings, latency_scale=latency_scale), state_dir=state_dir) as cluster:
        settings, bootstrap = cluster.settings, cluster.bootstrap
        console.print(f"[bold]frugalstream demo[/] embedded broker at {bootstrap}; "
                      f"{len(requests)} requests, simulated provider")
        started = time.monotonic()
        async with run_services(settings) as running:
            with Progress(console=console, transient=True) as progress:
                producer = asyncio.create_task(produce(bootstrap, settings, requests, rate))
                got = await collect_responses(bootstrap, settings, ids, timeout_s, progress)
                await producer
            accountant = running.service("accountant")
            assert isinstance(accountant, AccountantService)
            billable = sum(1 for rs in got.values() if rs[0].source != "error")
            await wait_priced(accountant, billable, 60.0)
            wall = time.monotonic() - started
            totals = await asyncio.to_thread(accountant.ledger.totals)
    return {**build_report(requests, got, totals, wall), "state_dir": str(state_dir),
            "ledger": str(state_dir / "ledger.sqlite"), "report_command": report_command(state_dir)}


def build_report(requests: list[LLMRequest], got: dict[str, list[LLMResponse]], totals: dict[str, Any],
                 wall_s: float) -> dict[str, Any]:
    first = [rs[0] for rs in got.values()]
    sources = Counter(r.source for r in first)
    latencies = sorted((r.responded_at - r.created_at) * 1000 for r in first if r.created_at)
    can_wait = {r.id for r in requests if may_wait(r)}
    interactive = sorted((r.responded_at - r.created_at) * 1000 for r in first
                         if r.created_at and r.request_id not in can_wait)
    return {
        "requests": len(requests),
        "responses": len(got),
        "duplicate_responses": sum(len(rs) - 1 for rs in got.values()),
        "errors": sources.get("error", 0),
        "by_source": dict(sources),
        "workload_mix": workload_mix(requests),
        "baseline_cost_usd": totals["baseline_cost_usd"],
        "actual_cost_usd": totals["actual_cost_usd"],
        "saved_usd": totals["saved_usd"],
        "savings_pct": totals["savings_pct"],
        "by_strategy": totals["by_strategy"],
        "deferrable": deferrable_report(requests, got),
        "latency_ms_p50": _quantile(latencies, 0.5),
        "latency_ms_p99": _quantile(latencies, 0.99),
        # Requests that can wait are held for a provider batch job on purpose: latency is the interactive ones'.
        "interactive_latency_ms_p50": _quantile(interactive, 0.5),
        "interactive_latency_ms_p99": _quantile(interactive, 0.99),
        "wall_time_s": round(wall_s, 2),
        "provider": "simulated",
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    return ordered[int(len(ordered) * q)] if ordered else None


def deferrable_report(requests: list[LLMRequest], got: dict[str, list[LLMResponse]]) -> dict[str, int]:
    """Requests that could wait: how many were answered, and how many before they were due (from the time
    the demo stamped on them, echoed on their answer)."""
    waiting = [r for r in requests if may_wait(r)]
    answered = [(r, got[r.id][0]) for r in waiting if r.id in got]
    on_time = sum(1 for r, a in answered if a.created_at is not None and a.responded_at <= (
        answer_by(r.model_copy(update={"created_at": a.created_at}), a.created_at) or 0.0))
    return {"requests": len(waiting), "answered": len(answered), "answered_before_deadline": on_time}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
