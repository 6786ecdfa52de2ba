"""`frugalstream serve http [service ...]`: the OpenAI-compatible HTTP entry, with any services beside it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence

from frugalstream.runtime.logging import configure_logging
from frugalstream.runtime.settings import Settings


async def serve_with_http(names: Sequence[str]) -> int:
    """Until SIGTERM or SIGINT: the HTTP entry stops taking calls first, then the services stop."""
    from frugalstream.http_entry.server import serve_http

    settings = Settings()
    configure_logging(settings.log_level, log_prompts=settings.log_prompts, fmt=settings.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if names:
            from frugalstream.tools.local_cluster import run_services

            await stack.enter_async_context(run_services(settings, names))
        await serve_http(settings, stop)
    return 0
