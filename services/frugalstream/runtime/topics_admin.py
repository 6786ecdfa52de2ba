"""Topic creation for operators (`frugalstream topics`) and the embedded broker."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from frugalstream.runtime.broker import aiokafka_security
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import topics as t


def topic_config(settings: Settings, name: str, compacted: Collection[str]) -> dict[str, str]:
    """Compacted state topics keep the latest value per key; paid-call records also expire with the
    idempotency retention (`compact,delete`), so the topic stays bounded."""
    if name not in compacted:
        return {}
    if name in (settings.topic(t.GATEWAY_COMPLETED), settings.topic(t.GATEWAY_BATCHES)):  # jobs expire alike
        return {"cleanup.policy": "compact,delete", "retention.ms": str(int(settings.idempotency_retention_s * 1000))}
    return {"cleanup.policy": "compact"}


async def ensure_topics(settings: Settings, specs: Mapping[str, int], *, compacted: Collection[str] = (),
                        replication: int = 1) -> list[str]:
    """Creates missing topics; existing ones are left as they are. Returns the names it created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **aiokafka_security(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(name, num_partitions=parts, replication_factor=replication,
                     topic_configs=topic_config(settings, name, compacted))
            for name, parts in specs.items() if name not in existing
        ]
        created: list[str] = []
        for topic in new:  # one by one: a topic created concurrently by another instance is not an error
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()
