"""Shared pieces of the fault tests (no tests here): services as OS processes, topic readers, workloads.

Each service runs as `frugalstream serve NAME` in its own process, so it can be SIGKILLed, SIGTERMed or
restarted exactly as in production; its JSON log goes to a file the test reads (the gateway writes one
`provider_call` line per completed, i.e. paid, model call).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from schemas import LLMRequest, LLMResponse
from services.core.settings import Settings
from services.demo_workload import load_demo_workload


def frugalstream_bin() -> list[str]:
    exe = shutil.which("frugalstream", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "services.cli"]


def fault_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The FRUGAL_* environment of a `serve` subprocess pointing at the test's broker and names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRUGAL_")}
    env.update({
        "FRUGAL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "FRUGAL_TOPIC_PREFIX": settings.topic_prefix,
        "FRUGAL_GROUP_PREFIX": settings.group_prefix, "FRUGAL_KAFKA_IDEMPOTENT": "false",
        "FRUGAL_KAFKA_FETCH_MAX_WAIT_MS": "50", "FRUGAL_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "FRUGAL_SIMULATED_LATENCY_SCALE": str(settings.simulated_latency_scale),
        "FRUGAL_STATE_DIR": str(settings.state_dir), "FRUGAL_PROVIDER": settings.provider,
        "FRUGAL_COALESCE_TIMEOUT_S": str(settings.coalesce_timeout_s), "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra)
    return env


class ServiceProcess:
    """One `frugalstream serve NAME` process; every start appends a numbered log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.log_dir = name, env, log_dir
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([*frugalstream_bin(), "serve", self.name], env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=log)

    async def wait_started(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while b"services_started" not in self.log_path.read_bytes():
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited: {self.tail()}"
            assert time.monotonic() < deadline, f"{self.name} did not start: {self.tail()}"
            await asyncio.sleep(0.1)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float = 40.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.name} did not exit within {timeout_s} s: {self.tail()}")
            await asyncio.sleep(0.05)
        return code

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait_exit()

    async def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return await self.wait_exit()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def events(self, event: str) -> list[dict[str, Any]]:
        """JSON log lines with this `event`, across every run of this service."""
        found: list[dict[str, Any]] = []
        for path in sorted(self.log_dir.glob(f"{self.name}.*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"{event}"' in line:
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found


def fresh_workload(n: int, tag: str) -> list[LLMRequest]:
    """The demo's realistic mix (FAQ repeats, routine, hard, long histories), with ids unique to the test."""
    base = load_demo_workload()
    return [base[i % len(base)].model_copy(update={"id": f"{tag}-{i}"}) for i in range(n)]


async def read_topics(settings: Settings, topics: Iterable[str], *, done: Callable[[list[Any]], bool],
                      timeout_s: float) -> list[Any]:
    """Every record of these (logical) topics from the start, until `done(records)` or the timeout."""
    consumer = AIOKafkaConsumer(*(settings.topic(x) for x in topics), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(records) and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200, max_records=2000)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def responses_by_id(records: Iterable[Any]) -> dict[str, Counter[str]]:
    """request id -> distinct terminal messages (canonical JSON) and how often each was published."""
    out: dict[str, Counter[str]] = {}
    for rec in records:
        response = LLMResponse.model_validate_json(rec.value)
        out.setdefault(response.request_id, Counter())[response.model_dump_json()] += 1
    return out
