"""`/readyz` stays 503 until the services' models are loaded, and loading them never stalls the event loop
(so `/healthz` keeps answering 200 while a slow disk reads the embedder)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

from prometheus_client import CollectorRegistry

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import Embedder, HashingEmbedder
from frugalstream.runner import RunningServices
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.probes import Health, probe_app
from frugalstream.runtime.settings import Settings


async def _ok() -> bool:
    return True


def test_not_ready_while_models_load_even_once_consumers_run() -> None:
    health = Health()
    health.attach(_ok)
    health.broker_ok = True
    assert health.reasons() == []
    health.loading("models")
    assert health.reasons() == ["loading models"]
    health.loaded("models")
    assert health.reasons() == []


def _get(health: Health, path: str) -> tuple[int, str]:
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status: list[str] = []
    body = b"".join(probe_app(health, Metrics(CollectorRegistry()))(environ, lambda s, _h: status.append(s)))
    return int(status[0].split()[0]), body.decode()


class GatedEmbedders:
    """An embedder factory that blocks (like a model read from a slow disk) until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.built = 0

    def __call__(self) -> Embedder:
        self.entered.set()
        self.gate.wait(timeout=5)
        self.built += 1
        return HashingEmbedder()


async def test_readyz_says_loading_models_while_they_load_and_the_loop_keeps_beating(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", semantic_verifier="features", kafka_idempotent=False)
    factory = GatedEmbedders()
    resources = Resources(settings, embedder_factory=factory)
    health = Health()
    beat = asyncio.create_task(health.run(beat_s=0.02))
    loading = asyncio.create_task(RunningServices.load(["classifier", "dedupe"], resources, health=health))
    try:
        for _ in range(250):  # the worker thread reaches the model; the loop polls meanwhile
            if factory.entered.is_set():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # a few beats while the model is still loading
        assert factory.entered.is_set() and not loading.done(), "the models load on a worker thread"
        assert _get(health, "/healthz") == (200, "ok\n"), "the loop beats while the models load"
        assert _get(health, "/readyz") == (503, "loading models; consumers not started\n")
        factory.gate.set()
        running = await loading
        assert factory.built == 1 and {"embedder", "verifier"} <= set(vars(resources)), "loaded before it returns"
        assert [s.name for s in running.services] == ["classifier", "dedupe"]
        health.refresh()
        assert health.readiness() == (False, "consumers not started")  # next: start the consumers (`async with`)
    finally:
        factory.gate.set()
        beat.cancel()
        await asyncio.gather(beat, loading, return_exceptions=True)
        resources.close()
