"""Checks a command makes before it needs Kafka: a bootstrap nobody answers is one line, not a traceback.

aiokafka's own failure is a multi-line `KafkaConnectionError` after its retries (and FastStream may keep
retrying a subscriber); a plain TCP connect to each bootstrap address answers the common case (a wrong
address, a broker that is not running) in a few seconds, naming the setting to fix.
"""

from __future__ import annotations

import os
import socket

from frugalstream.runtime.settings import Settings, UsageError

_SETTING = "FRUGAL_KAFKA_BOOTSTRAP"


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (IPv6 as `[::1]:9092`), or a UsageError naming the setting."""
    out = []
    for part in (p.strip() for p in bootstrap.split(",")):
        host, sep, port = part.rpartition(":")
        if not part or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"setting {_SETTING}={bootstrap!r}: {part!r} is not host:port "
                             "(allowed: host:port, comma-separated, e.g. broker1:9092,broker2:9092)")
        out.append((host.strip("[]"), int(port)))
    return out


def check_bootstrap(settings: Settings, timeout_s: float = 3.0, command: str = "") -> None:
    """Returns when at least one bootstrap address accepts a TCP connection; else one line and exit 2."""
    addresses = bootstrap_addresses(settings.kafka_bootstrap)
    errors = []
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    where = f"{_SETTING}={settings.kafka_bootstrap!r}" if _SETTING in os.environ else (
        f"{_SETTING} (not in the environment, so {settings.kafka_bootstrap!r})")
    prefix = f"{command}: " if command else ""
    raise UsageError(f"{prefix}cannot reach Kafka at {where}: {'; '.join(errors)}. Start the broker or set "
                     f"{_SETTING} to its host:port")
