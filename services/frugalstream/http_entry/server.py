"""Runs the HTTP entry: its Kafka client, then uvicorn, until `stop` is set; then both stop, in that order.

Many entries run side by side: each reads every answer partition on its own (no consumer group) and
remembers the recent answers it reads, so a load balancer may send any call, or its retry, to any entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from frugalstream.client import FrugalClient
from frugalstream.http_entry.app import Entry, build_app, listed_models
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.pricing import Pricer
from frugalstream.resources import Resources
from frugalstream.runtime.heap import startup_heap_frozen
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, TenantPolicy

log = get_logger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the command that runs us owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class RunningHttp:
    url: str
    entry: Entry


def _entry(settings: Settings, client: FrugalClient, keys: ApiKeys, pricer: Pricer) -> Entry:
    tiers = [m for tier in ("small", "mid", "large") for m in settings.tiers.for_tier(tier)]
    catalog = list(pricer.catalog.models)

    def models(tenant: str) -> list[str]:
        policy = settings.tenants.get(tenant, TenantPolicy())
        return listed_models(tiers, policy.allowed_models, catalog)

    # One tenant behind the entry has no one to starve: it keeps the whole queue.
    shared = len(keys.tenants) > 1
    return Entry(client, keys, pricer, models, max_pending=settings.http_max_pending,
                 timeout_s=settings.http_timeout_s, max_body_bytes=settings.max_message_bytes,
                 tenant_max_pending=max(1, int(settings.http_max_pending * settings.http_tenant_pending_share))
                 if shared else None)


@contextlib.asynccontextmanager
async def http_entry(settings: Settings, *, host: str | None = None, port: int | None = None,
                     dev: bool = False) -> AsyncIterator[RunningHttp]:
    """The entry listening on host:port (settings' by default; port 0 picks a free one) until the block ends."""
    keys = ApiKeys.from_settings(settings, dev=dev)
    if not keys:
        log.warning("http_no_api_keys", hint="set FRUGAL_HTTP_API_KEYS or FRUGAL_HTTP_API_KEYS_FILE: every call "
                                             "gets 401 until then")
    resources = Resources(settings)
    pricer = await asyncio.to_thread(lambda: Pricer(settings, resources.catalog, resources.counter))
    client = FrugalClient("http-entry", settings=settings, timeout_s=settings.http_timeout_s,
                          client_id=f"frugalstream-http-{socket.gethostname()}-{os.getpid()}",
                          remember_unasked=True)  # a retry sent to another entry is replayed from any
    await client.start()
    entry = _entry(settings, client, keys, pricer)
    config = uvicorn.Config(build_app(entry), host=host or settings.http_host,
                            port=settings.http_port if port is None else port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="frugalstream-http")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it (a port in use, say)
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()
        url = f"http://{bound[0]}:{bound[1]}"
        log.info("http_started", url=url, keys=len(keys))
        with startup_heap_frozen():  # what start made is skipped by full collections, which stop the loop
            yield RunningHttp(url, entry)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await task
        await client.stop()


async def serve_http(settings: Settings, stop: asyncio.Event, *, dev: bool = False) -> None:
    async with http_entry(settings, dev=dev) as running:
        print(f"frugalstream http ready url={running.url}", flush=True)
        await stop.wait()
