"""`frugalstream dev` as a user runs it: a subprocess that prints one ready line, answers a request produced
with a plain Kafka client, and on SIGTERM exits 0 leaving no broker process behind."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t

pytestmark = [pytest.mark.integration, pytest.mark.slow]

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_pids(port: int) -> list[int]:
    """Tansu processes listening on `port`, read from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "tansu" in cmdline and f"127.0.0.1:{port}" in cmdline:
            found.append(int(entry.name))
    return found


def wait_ready(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    lines: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            line = process.stdout.readline().decode()
            lines.append(line)
            if "ready" in line:
                return line
    raise AssertionError(f"no ready line within {READY_TIMEOUT_S} s (exit {process.poll()}): {lines}")


async def ask(bootstrap: str, request: LLMRequest, timeout_s: float = 60.0) -> LLMResponse:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(t.REQUESTS, request.model_dump_json().encode(), key=request.id.encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(t.RESPONSES, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    response = LLMResponse.model_validate_json(rec.value)
                    if response.request_id == request.id:
                        return response
    finally:
        await consumer.stop()
    raise AssertionError(f"no answer for {request.id} within {timeout_s} s")


def test_dev_mode_answers_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "FRUGAL_STATE_DIR": str(tmp_path / "state"), "FRUGAL_SIMULATED_LATENCY_SCALE": "0.01",
           "FRUGAL_LOG_LEVEL": "WARNING"}
    env.pop("FRUGAL_PROVIDER", None)
    env.pop("FRUGAL_TOPIC_PREFIX", None)
    stderr = (tmp_path / "stderr.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "frugalstream", "dev", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=tmp_path)
    try:
        line = wait_ready(process)
        assert f"bootstrap=127.0.0.1:{port}" in line
        assert broker_pids(port), "the embedded broker runs on the requested port"
        request = LLMRequest(id="dev-1", tenant="acme", messages=(ChatMessage(role="user", content="What is 2+2?"),))
        response = asyncio.run(ask(f"127.0.0.1:{port}", request))
        assert response.ok and response.simulated, "answered by the simulated provider"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
        assert process.stdout is not None
        rest = process.stdout.read().decode()
        assert "ready" not in rest, "exactly one ready line"
        deadline = time.monotonic() + 5
        while broker_pids(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert broker_pids(port) == [], "no Tansu process left behind"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in broker_pids(port):
            os.kill(pid, signal.SIGKILL)
        stderr.close()
        if process.stdout is not None:
            process.stdout.close()


async def test_dev_mode_stops_the_broker_when_the_services_fail_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import frugalstream.runner
    from frugalstream.runtime.settings import Settings
    from frugalstream.tools.devmode import dev_settings, run_dev

    class Broken:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def __aenter__(self) -> None:
            raise RuntimeError("a service failed to start")

        async def __aexit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(frugalstream.runner, "RunningServices", Broken)
    port = free_port()
    settings = dev_settings(port, Settings(state_dir=tmp_path / "state"))
    with pytest.raises(RuntimeError, match="failed to start"):
        await run_dev(settings, asyncio.Event())
    assert broker_pids(port) == [], "the broker is stopped on the failure path too"
