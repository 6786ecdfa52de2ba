"""Runs the review page with uvicorn until interrupted (the command owns SIGINT and SIGTERM, as `serve` does)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlencode

import uvicorn

from frugalstream.tools.audit_review.app import LOCAL_HOSTS, ReviewSession, build_app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def page_url(url: str, session: ReviewSession) -> str:
    """The address a person opens: the server's URL with this run's token, without which nothing is served."""
    return f"{url}?{urlencode({'token': session.token})}"


def base_url(host: str, port: int) -> str:
    """The server's URL; an IPv6 address goes in brackets (`http://::1:8765/` is no URL)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.asynccontextmanager
async def review_server(session: ReviewSession, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """The page listening on host:port (0 picks a free port) until the block ends; yields its base URL (the
    API's; `page_url` adds the token a browser needs)."""
    # bound wider on purpose: the page and the API still want the token, only the Host check is loopback's (with
    # the address bound, which the printed URL names: 127.0.0.2 is this machine too)
    hosts = (*LOCAL_HOSTS, host) if is_loopback(host) else ("*",)
    config = uvicorn.Config(build_app(session, hosts), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config)
    task = asyncio.create_task(server.serve(), name="frugalstream-audit-review")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the review server stopped before it started")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()
        shown = "127.0.0.1" if host in ("127.0.0.1", "localhost") else bound[0]
        yield base_url(shown, bound[1])
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await task


async def serve_until_stopped(session: ReviewSession, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with review_server(session, host, port) as url:
        print(f"frugalstream audit review: {len(session.items)} audits of {session.tenant} await a verdict at "
              f"{page_url(url, session)} (a accept, r reject, s skip; Ctrl-C to stop)", flush=True)
        await stop.wait()
    state = session.state()["progress"]
    print(f"reviewed {state['reviewed']} of {state['total']} ({state['skipped']} skipped)", flush=True)
