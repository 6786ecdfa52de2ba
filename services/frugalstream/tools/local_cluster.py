"""A local cluster: the embedded broker with every topic, settings that fit it, and services running on it.

One helper for the demo, `frugalstream dev`, the benches and the integration tests, so that what Tansu needs
from a client, the topic layout and the order of start and release are written once.

    async with local_cluster(my_settings) as cluster:
        async with run_services(cluster.settings, ["classifier", "dedupe"]) as running:
            ...
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from frugalstream.runtime.kafka_options import MIN_KAFKA_SESSION_TIMEOUT_MS, TANSU_FETCH_MAX_WAIT_MS
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker

if TYPE_CHECKING:
    from frugalstream.llm.embedder import Embedder
    from frugalstream.llm.providers import Provider
    from frugalstream.runner import RunningServices

#: One count for every topic: the co-partitioned ones (routed, responses, cache, waiting) must be equal.
PARTITIONS = 4

#: What a client of the embedded broker needs: Tansu has no idempotent producer and answers waiting fetches
#: late, it speaks plaintext only, and the shortest session timeout Kafka allows makes rebalances quick.
EMBEDDED_CLIENT: Mapping[str, object] = {
    "kafka_idempotent": False, "kafka_security_protocol": "PLAINTEXT",
    "kafka_fetch_max_wait_ms": TANSU_FETCH_MAX_WAIT_MS, "kafka_session_timeout_ms": MIN_KAFKA_SESSION_TIMEOUT_MS,
}

#: Builds the settings once the broker listens: (bootstrap address, state dir) -> Settings.
SettingsFactory = Callable[[str, Path], Settings]


def cluster_settings(bootstrap: str, state_dir: Path, **overrides: Any) -> Settings:
    """Settings (environment and `frugalstream.toml` included) for the embedded broker at `bootstrap`."""
    return Settings(**{"kafka_bootstrap": bootstrap, "state_dir": state_dir, **EMBEDDED_CLIENT, **overrides})


async def create_topics(broker: EmbeddedBroker, settings: Settings, partitions: int = PARTITIONS) -> None:
    """Every topic (and DLQ) under the settings' prefix, all with `partitions`; existing ones are kept."""
    await broker.create_topics({settings.topic(name): partitions for name in t.ALL_TOPICS})


@dataclass(frozen=True)
class LocalCluster:
    broker: EmbeddedBroker
    settings: Settings
    partitions: int

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap


@asynccontextmanager
async def local_cluster(settings: Settings | SettingsFactory = cluster_settings, *,
                        partitions: int = PARTITIONS, state_dir: Path | None = None) -> AsyncIterator[LocalCluster]:
    """An embedded broker with every topic, stopped on every path out (also when the block raises).

    A `Settings` pins the port (its bootstrap address) and keeps the state, and the broker's log, in its
    state dir, as `frugalstream dev` wants. A factory gets a free port and a temporary state dir that is
    removed on exit, as the benches and the tests want (or `state_dir`, kept, as the demo wants); it is
    called once the broker listens.
    """
    with ExitStack() as stack:
        if isinstance(settings, Settings):
            port: int | None = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
            state_dir = settings.state_dir
            state_dir.mkdir(parents=True, exist_ok=True)
        else:
            port = None
            if state_dir is None:
                state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="frugalstream-")))
            state_dir.mkdir(parents=True, exist_ok=True)
        async with EmbeddedBroker(port=port, log_dir=state_dir / "tansu") as broker:
            built = settings if isinstance(settings, Settings) else settings(broker.bootstrap, state_dir)
            await create_topics(broker, built, partitions)
            yield LocalCluster(broker, built, partitions)


@asynccontextmanager
async def run_services(settings: Settings, names: Sequence[str] | None = None, *,
                       embedder: Callable[[], Embedder] | None = None,
                       provider: Callable[[str], Provider] | None = None) -> AsyncIterator[RunningServices]:
    """The named services (default: all) running on `settings`' broker; their resources are released on exit.

    `embedder` and `provider` replace the real factories (tests pass fakes). Bootstrap is imported here, not
    at the top: it loads every service, which `frugalstream dev --help` and a bench's argument errors need not.
    """
    from frugalstream import runner
    from frugalstream.bootstrap import SERVICE_NAMES, Resources

    factories: dict[str, Any] = {}
    if embedder is not None:
        factories["embedder_factory"] = embedder
    if provider is not None:
        factories["provider_factory"] = provider
    resources = Resources(settings, **factories)
    try:
        async with runner.RunningServices(SERVICE_NAMES if names is None else names, resources) as running:
            yield running
    finally:
        resources.close()
