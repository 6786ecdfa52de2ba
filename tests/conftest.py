"""Shared pytest fixtures: the embedded Kafka-protocol broker for integration tests, and logging reset per test.

The broker is started once per session as a plain (sync) fixture, so it does not depend on the event
loop scope pytest-asyncio is configured with; each test isolates itself with its own topic names and
consumer groups (see :func:`unique_name`), never by restarting the broker.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import structlog

from frugalstream.tools.embedded_broker import BrokerBinaryNotFoundError, EmbeddedBroker


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers here so ``--strict-markers`` accepts them wherever pytest is configured."""
    config.addinivalue_line("markers", "integration: needs a Kafka-protocol broker (the embedded Tansu one)")
    config.addinivalue_line("markers", "slow: takes more than 10 s")


@pytest.fixture(autouse=True)
def _structlog_config_per_test() -> Iterator[None]:
    """A CLI run in-process configures structlog (a WARNING filter, a stderr sink); a later test must neither
    lose its `capture_logs` lines to that filter nor write to a closed capture, so every test starts alike."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


_UNSAFE = re.compile(r"[^a-zA-Z0-9._-]+")


def unique_name(label: str, *, max_label: int = 40) -> str:
    """Return ``<label>-<8 hex>``, a Kafka-legal topic / group name no other test (or run) uses.

    Topics and consumer groups outlive a test on the session broker, so every test names its own;
    the label keeps them readable in the broker log. Kafka allows ``[a-zA-Z0-9._-]``, at most 249 chars.
    """
    safe = _UNSAFE.sub("-", label).strip("-.")[:max_label] or "t"
    return f"{safe}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One Tansu broker for the whole session; its log is kept under pytest's basetemp for debugging.

    A missing binary fails the test instead of skipping it: a skipped integration suite in CI looks
    exactly like a green one.
    """
    broker = EmbeddedBroker(log_dir=tmp_path_factory.mktemp("tansu"))
    try:
        broker.start()
    except BrokerBinaryNotFoundError as exc:
        pytest.fail(f"Integration tests need the embedded broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(embedded_broker: EmbeddedBroker) -> str:
    """Bootstrap address (``127.0.0.1:PORT``) of the session's embedded broker."""
    return embedded_broker.bootstrap


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix unique to this test (and run) for its topic and group names, e.g. ``f"{topic_prefix}.in"``."""
    return unique_name(request.node.name)
