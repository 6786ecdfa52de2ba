"""Shared pieces of the fault tests (no tests here): services as OS processes, topic readers, workloads, and a
fake OpenAI-compatible provider that counts every call it receives.

Each service runs as `frugalstream serve NAME` in its own process, so it can be SIGKILLed, SIGTERMed or
restarted exactly as in production; its JSON log goes to a file the test reads (the gateway writes one
`provider_call` line per completed, i.e. paid, model call). Payments are best counted where they happen: at
the provider, per call (`CountingOpenAI`), which no id or log line can collapse.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from typing import Any, Self

from aiokafka import AIOKafkaConsumer

from frugalstream.llm.identity import request_key
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.tools.demo_workload import load_demo_workload


def frugalstream_bin() -> list[str]:
    exe = shutil.which("frugalstream", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "frugalstream"]


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
        # An audit pays the baseline again for the same prompt on purpose (tests/unit/test_audits.py): off here,
        # so a second call to the fake provider can only be the paid-once promise breaking.
        "FRUGAL_AUDIT_RATE": "0",
    })
    env.update(extra)
    return env


class ServiceProcess:
    """One `frugalstream serve NAME` process; every start appends a numbered log file, `<label>.<run>.log`
    (the label defaults to the service name; replicas of one service need distinct labels)."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, label: str | None = None) -> None:
        self.name, self.env, self.log_dir = name, env, log_dir
        self.label = label or name
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.label}.{self.runs}.log"

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

    def events(self, event: str, run: int | None = None) -> list[dict[str, Any]]:
        """JSON log lines with this `event`, across every run of this process (or only run number `run`)."""
        found: list[dict[str, Any]] = []
        paths = [self.log_dir / f"{self.label}.{run}.log"] if run is not None else \
            sorted(self.log_dir.glob(f"{self.label}.*.log"))
        for path in paths:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"{event}"' in line:
                    record = json.loads(line)
                    if record.get("event") == event:
                        found.append(record)
        return found


def fresh_workload(n: int, tag: str) -> list[LLMRequest]:
    """The demo's realistic mix (FAQ repeats, routine, hard, long histories), with ids unique to the test.

    All interactive: the demo's deferrable share waits for a batch job (a minute's gathering by default), and
    these tests are about what a fault does to calls answered now (tests/integration/test_batch_deferred.py
    holds the batch path to the same promises)."""
    base = load_demo_workload()
    return [base[i % len(base)].model_copy(update={"id": f"{tag}-{i}", "latency_class": "interactive",
                                                   "deadline": None}) for i in range(n)]


async def read_physical(settings: Settings, physical_topics: Iterable[str], *, done: Callable[[list[Any]], bool],
                        timeout_s: float) -> list[Any]:
    """Every record of these topics (full names) from the start, until `done(records)` or the timeout."""
    consumer = AIOKafkaConsumer(*physical_topics, bootstrap_servers=settings.kafka_bootstrap,
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


async def read_topics(settings: Settings, topics: Iterable[str], *, done: Callable[[list[Any]], bool],
                      timeout_s: float) -> list[Any]:
    """Every record of these (logical) topics from the start, until `done(records)` or the timeout."""
    return await read_physical(settings, [settings.topic(x) for x in topics], done=done, timeout_s=timeout_s)


def _distinct_by(records: Iterable[Any], key: Callable[[LLMResponse], str]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for rec in records:
        response = LLMResponse.model_validate_json(rec.value)
        out.setdefault(key(response), Counter())[response.model_dump_json()] += 1
    return out


def responses_by_id(records: Iterable[Any]) -> dict[str, Counter[str]]:
    """request id -> distinct terminal messages (canonical JSON) and how often each was published."""
    return _distinct_by(records, lambda r: r.request_id)


def answers_by_key(records: Iterable[Any]) -> dict[str, Counter[str]]:
    """`request_key(tenant, id)` -> distinct terminal messages and how often each was published."""
    return _distinct_by(records, lambda r: request_key(r.tenant, r.request_id))


async def read_until_quiet(settings: Settings, topics: Iterable[str], *, keys: set[str], quiet_s: float = 3.0,
                           timeout_s: float = 120.0) -> list[Any]:
    """Every record of these topics until each of `keys` (request keys) has an answer, and then for `quiet_s`
    more: a second, different answer arriving after the first ones (a late redelivery, a timed-out follower
    re-dispatched) is read too, so the caller's "exactly one distinct answer" check can see it."""
    answered_at: list[float] = []

    def done(records: list[Any]) -> bool:
        if not answered_at:
            if not set(answers_by_key(records)) >= keys:
                return False
            answered_at.append(time.monotonic())
        return time.monotonic() - answered_at[0] >= quiet_s

    return await read_topics(settings, topics, done=done, timeout_s=timeout_s + quiet_s)


class FakeChatServer:
    """A raw asyncio HTTP/1.1 server on 127.0.0.1 for OpenAI-compatible fakes: raw, so a fake can also hold a
    call, reset a connection or cut a body short. Subclasses answer one parsed JSON body in `answer`, writing
    to the stream, and return False to drop the connection."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length"))
                    if not await self.answer(json.loads(await reader.readexactly(length)), writer):
                        return
        finally:
            writer.close()
            self.writers.discard(writer)


class CountingOpenAI(FakeChatServer):
    """A raw asyncio OpenAI-compatible Chat Completions server that counts every call per prompt (the last
    message's text). Each test request has a unique prompt, so `calls[prompt] > 1` is a second payment.

    The answer names the call's number (`... #2`), so a second payment is also a different answer. `latency_s`
    keeps calls in flight for a while. The first call of a prompt in `hold` is never answered; `held` is set
    when it arrives, so a test can kill the gateway while that call is in flight (a placement, not a timer).
    """

    def __init__(self, latency_s: float = 0.0, hold: Iterable[str] = ()) -> None:
        self.calls: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.latency_s = latency_s
        self.hold = set(hold)
        self.held = asyncio.Event()
        super().__init__()

    def env(self) -> dict[str, str]:
        """The gateway's provider settings pointing at this server (dummy keys: nothing real is called)."""
        return {"FRUGAL_PROVIDER": "openai", "FRUGAL_OPENAI_BASE_URL": self.url, "FRUGAL_OPENAI_API_KEY": "sk-test",
                "FRUGAL_ANTHROPIC_API_KEY": "sk-ant-test", "FRUGAL_PROVIDER_TIMEOUT_S": "20"}

    async def answer(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        prompt = str(body["messages"][-1]["content"])
        self.calls[prompt] += 1
        if prompt in self.hold and self.calls[prompt] == 1:
            self.held.set()
            await asyncio.sleep(3600)  # in flight until the connection dies with the gateway
        await asyncio.sleep(self.latency_s)
        n = self.calls[prompt]
        answer = {"id": f"c-{n}", "model": body["model"],
                  "choices": [{"message": {"role": "assistant", "content": f"{prompt} #{n}"},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
        data = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     + f"content-length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        self.answered[prompt] += 1
        return True
