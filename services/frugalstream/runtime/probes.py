"""Liveness and readiness, and the HTTP server that answers `/metrics`, `/healthz` and `/readyz` (404 otherwise).

The server runs on a thread, so it would answer while the event loop is wedged: liveness therefore means "the
loop ran `Health.run` recently", not "the thread answered". Readiness means the services' models are loaded
(the embedder, the verifier: `loading`), the consumers are started, the broker answered a metadata request
recently, and every group member got its first assignment and loaded the state of the partitions it owns
(`OwnedPartitions.unready`). Both are computed on the loop, as a snapshot the thread only reads: the thread
never touches loop state, and a stalled loop makes both answers go stale.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics

log = get_logger(__name__)

#: How often the loop refreshes the snapshot, and how old it may get before the loop counts as stalled.
BEAT_S = 1.0
STALE_AFTER_S = 30.0
#: Broker check: a metadata request every PING_S, failing after PING_TIMEOUT_S.
PING_S = 5.0
PING_TIMEOUT_S = 3.0


class Member(Protocol):
    """A group consumer's rebalance listener, as readiness sees it (`OwnedPartitions`)."""

    joined: bool

    def unready(self) -> set[int]: ...


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic() of the loop iteration that took it
    ready: bool
    reasons: tuple[str, ...]


class Health:
    """What `/healthz` and `/readyz` answer. `attach` when the consumers started, `detach` when they stop."""

    def __init__(self, *, stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._members: list[tuple[str, Member]] = []
        self._ping: Callable[[], Awaitable[bool]] | None = None
        self.broker_ok: bool | None = None  # None: not checked since attach
        self.snapshot: Snapshot | None = None
        self._loading: set[str] = set()

    def loading(self, what: str) -> None:
        """`what` (models, say) is being loaded: not ready until `loaded(what)`."""
        self._loading.add(what)

    def loaded(self, what: str) -> None:
        self._loading.discard(what)

    def track(self, service: str, member: Member) -> None:
        self._members.append((service, member))

    def attach(self, ping: Callable[[], Awaitable[bool]]) -> None:
        """The consumers are started; `ping` tells whether the broker answers."""
        self._ping, self.broker_ok = ping, None

    def detach(self) -> None:
        """Stopping: not ready from now on (a rolling update may count this instance out at once)."""
        self._ping = None
        self.refresh()

    def reasons(self) -> list[str]:
        """Why this process is not ready (empty: ready). Runs on the loop."""
        why = [f"loading {what}" for what in sorted(self._loading)]
        if self._ping is None:
            return [*why, "consumers not started"]
        if self.broker_ok is not True:
            why.append("broker not reachable" if self.broker_ok is False else "broker not checked yet")
        for service, member in self._members:
            if not member.joined:
                why.append(f"{service}: no partition assignment yet")
            elif pending := member.unready():
                why.append(f"{service}: state of partitions {sorted(pending)} not loaded")
        return why

    def refresh(self) -> Snapshot:
        why = self.reasons()
        self.snapshot = Snapshot(self._clock(), not why, tuple(why))
        return self.snapshot

    def liveness(self) -> tuple[bool, str]:
        snap = self.snapshot
        if snap is None:
            return False, "event loop not running the health task"
        age = self._clock() - snap.at
        if age > self._stale_after_s:
            return False, f"event loop stalled: last beat {age:.0f} s ago"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        alive, why = self.liveness()
        snap = self.snapshot
        if not alive or snap is None:
            return False, why
        return snap.ready, "ready" if snap.ready else "; ".join(snap.reasons)

    async def _check_broker(self) -> None:
        ping = self._ping
        if ping is None:
            return
        try:
            ok = await asyncio.wait_for(ping(), PING_TIMEOUT_S)
        except Exception:
            ok = False
        if self._ping is ping:  # not detached (or attached again) meanwhile
            if ok != self.broker_ok:
                log.info("broker_reachable" if ok else "broker_unreachable")
            self.broker_ok = ok

    async def run(self, *, beat_s: float = BEAT_S, ping_s: float = PING_S) -> None:
        """Refreshes the snapshot every `beat_s` and checks the broker every `ping_s` (in its own task, so a
        slow broker never delays the beat). Runs until cancelled."""
        checking: asyncio.Task[None] | None = None
        last_ping = -ping_s
        try:
            while True:
                now = self._clock()
                if self._ping is not None and (checking is None or checking.done()) and (
                        now - last_ping >= ping_s or self.broker_ok is None):
                    checking = asyncio.create_task(self._check_broker(), name="frugal-broker-ping")
                    last_ping = now
                self.refresh()
                await asyncio.sleep(beat_s)
        finally:
            if checking is not None:
                checking.cancel()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes every few seconds would flood stderr


def probe_app(health: Health, metrics: Metrics = METRICS) -> Callable[..., Iterable[bytes]]:
    """WSGI: `/metrics` (Prometheus), `/healthz` and `/readyz` (200 or 503, with the reason), else 404."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            result: Iterable[bytes] = prometheus(environ, start_response)
            return result
        if path in ("/healthz", "/readyz"):
            ok, why = health.liveness() if path == "/healthz" else health.readiness()
            body = f"{why}\n".encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        body = b"not found: /metrics, /healthz, /readyz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]

    return app


def start_probe_server(port: int, health: Health, addr: str = "0.0.0.0", metrics: Metrics = METRICS
                       ) -> tuple[WSGIServer, threading.Thread]:
    """Serves `probe_app` on a daemon thread; port 0 picks a free port (`server.server_port`). Run `health.run()`
    on the event loop too, or liveness fails."""
    server = make_server(addr, port, probe_app(health, metrics), ThreadingWSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="frugal-probes", daemon=True)
    thread.start()
    return server, thread
