"""The embedded broker and the Kafka features frugalstream relies on, verified against it.

These tests pin down what the services assume from any Kafka-protocol broker (keys, headers, consumer
groups, rebalancing, manual commits, FastStream's commit-after-handler) and how clients behave when the
broker hangs. Options come from :mod:`frugalstream.runtime.kafka_options`, the same ones the services use.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.kafka.schemas import Topic

from frugalstream.runtime.kafka_options import (
    MIN_KAFKA_SESSION_TIMEOUT_MS,
    TANSU_FETCH_MAX_WAIT_MS,
    consumer_options,
    producer_options,
    subscriber_options,
)
from frugalstream.tools.embedded_broker import (
    BROKER_BIN_ENV,
    BrokerBinaryNotFoundError,
    EmbeddedBroker,
    find_broker_binary,
)

pytestmark = pytest.mark.integration

#: The quickest group settings a real Kafka also accepts (see kafka_options).
FAST_GROUP: dict[str, int] = {
    "fetch_max_wait_ms": TANSU_FETCH_MAX_WAIT_MS,
    "session_timeout_ms": MIN_KAFKA_SESSION_TIMEOUT_MS,
    "heartbeat_interval_ms": 500,
}


# ---------------------------------------------------------------------------------------------- helpers


@asynccontextmanager
async def producer(bootstrap: str, **overrides: Any) -> AsyncIterator[Any]:
    """A started AIOKafkaProducer with the services' options (idempotence off: Tansu has none)."""
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, **{**producer_options(idempotent=False), **overrides})
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


def group_consumer(bootstrap: str, group: str, *topics: str, client_id: str = "test") -> Any:
    """An (unstarted) AIOKafkaConsumer in ``group`` with manual commits and quick rebalances."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=client_id,
        **consumer_options(**FAST_GROUP),
    )


def expected_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for a key; Java clients agree."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll ``check`` every 50 ms until it is true; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """Read the group's committed offsets from outside the group (OffsetFetch does not join it)."""
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await probe.start()
    try:
        return {p: await probe.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await probe.stop()


async def poll(consumer: Any, into: list[Any], timeout_ms: int = 100) -> None:
    """One ``getmany`` round, appending the records to ``into``."""
    for records in (await consumer.getmany(timeout_ms=timeout_ms)).values():
        into.extend(records)


# ------------------------------------------------------------------------------------- the broker itself


def test_sync_lifecycle_and_process_cleanup(tmp_path: Path) -> None:
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        pid = broker.pid
        assert broker.running
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert "ready in" in broker.log_path.read_text()
    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.stop()  # idempotent


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert find_broker_binary().name == "tansu"
    monkeypatch.setenv(BROKER_BIN_ENV, str(tmp_path / "no-such-tansu"))
    with pytest.raises(BrokerBinaryNotFoundError, match=BROKER_BIN_ENV):
        EmbeddedBroker().start()


async def test_create_topics_is_idempotent(embedded_broker: EmbeddedBroker, topic_prefix: str) -> None:
    specs = {f"{topic_prefix}.a": 4, f"{topic_prefix}.b": 1}
    await embedded_broker.create_topics(specs)
    await embedded_broker.create_topics(specs)
    with pytest.raises(RuntimeError, match="different partition count"):
        await embedded_broker.create_topics({f"{topic_prefix}.a": 2})


# ------------------------------------------------------------------------------- (a) keys and headers


async def test_keyed_messages_with_headers_keep_partition_and_order(
    embedded_broker: EmbeddedBroker, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}.keyed"
    await embedded_broker.create_topics({topic: 4})
    keys = [f"scope-{i}".encode() for i in range(10)]

    sent: list[tuple[bytes, int, int]] = []
    async with producer(kafka_bootstrap) as prod:
        for seq in range(4):
            for key in keys:
                meta = await prod.send_and_wait(
                    topic,
                    f"{key.decode()}#{seq}".encode(),
                    key=key,
                    headers=[("request-id", f"{key.decode()}-{seq}".encode()), ("tenant", b"acme")],
                )
                sent.append((key, meta.partition, meta.offset))

    for key, partition, _ in sent:
        assert partition == expected_partition(key, 4), key
    assert len({partition for _, partition, _ in sent}) > 1, "keys should spread over partitions"

    consumer = group_consumer(kafka_bootstrap, f"{topic_prefix}.g", topic)
    await consumer.start()
    received: list[Any] = []
    try:

        async def all_received() -> bool:
            await poll(consumer, received)
            return len(received) >= len(sent)

        await eventually(all_received, within=20, what="all 40 keyed records")
    finally:
        await consumer.stop()

    assert len(received) == len(sent)
    by_key: dict[bytes, list[str]] = {}
    for record in received:
        headers = dict(record.headers)
        assert headers["tenant"] == b"acme"
        assert headers["request-id"].decode() == record.value.decode().replace("#", "-")
        assert record.partition == expected_partition(record.key, 4)
        by_key.setdefault(record.key, []).append(record.value.decode())
    for key in keys:
        assert by_key[key] == [f"{key.decode()}#{seq}" for seq in range(4)], "per-key order must hold"


# ------------------------------------------------------------------- (b) consumer groups and rebalance


@pytest.mark.slow
async def test_group_splits_partitions_and_survivor_resumes_from_committed_offsets(
    embedded_broker: EmbeddedBroker, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.work", f"{topic_prefix}.g"
    await embedded_broker.create_topics({topic: 4})
    a = group_consumer(kafka_bootstrap, group, topic, client_id="a")
    b = group_consumer(kafka_bootstrap, group, topic, client_id="b")
    await asyncio.gather(a.start(), b.start())
    try:

        async def split() -> bool:
            await asyncio.gather(a.getmany(timeout_ms=50), b.getmany(timeout_ms=50))
            mine, theirs = a.assignment(), b.assignment()
            return bool(mine) and bool(theirs) and len(mine | theirs) == 4 and not mine & theirs

        await eventually(split, within=30, what="both members to own partitions")
        b_partitions = {tp.partition for tp in b.assignment()}

        # Batch 1: each member processes and commits its own records.
        end: dict[int, int] = dict.fromkeys(range(4), 0)
        async with producer(kafka_bootstrap) as prod:
            for i in range(40):
                meta = await prod.send_and_wait(topic, f"m{i}".encode(), key=f"k{i}".encode())
                end[meta.partition] = meta.offset + 1
        got_a: list[Any] = []
        got_b: list[Any] = []

        async def batch1_done() -> bool:
            await asyncio.gather(poll(a, got_a, 50), poll(b, got_b, 50))
            return len(got_a) + len(got_b) >= 40

        await eventually(batch1_done, within=20, what="batch 1 to be consumed")
        assert {r.partition for r in got_a}.isdisjoint({r.partition for r in got_b})
        assert {r.partition for r in got_b} <= b_partitions
        await asyncio.gather(a.commit(), b.commit())

        # Batch 2 lands on B's partitions only; B processes it but commits just the first record of each.
        b_keys = [k for k in (f"x{i}".encode() for i in range(200)) if expected_partition(k, 4) in b_partitions]
        async with producer(kafka_bootstrap) as prod:
            for key in b_keys[:20]:
                meta = await prod.send_and_wait(topic, key, key=key)
                end[meta.partition] = meta.offset + 1
        seen_b: list[Any] = []

        async def b_saw_batch2() -> bool:
            await poll(b, seen_b, 50)
            return len(seen_b) >= 20

        await eventually(b_saw_batch2, within=20, what="B to read batch 2")
        b_commits: dict[TopicPartition, int] = {}
        for record in seen_b:
            tp = TopicPartition(record.topic, record.partition)
            b_commits.setdefault(tp, record.offset + 1)
        await b.commit(b_commits)
    finally:
        await b.stop()  # B leaves; its uncommitted records must go to A

    try:
        taken: list[Any] = []

        async def a_took_over() -> bool:
            await poll(a, taken, 50)
            return len(a.assignment()) == 4 and len(taken) >= 20 - len(b_commits)

        await eventually(a_took_over, within=30, what="A to take over B's partitions")
        for tp, committed in b_commits.items():
            offsets = sorted(r.offset for r in taken if r.partition == tp.partition)
            assert offsets, f"A received nothing from {tp}"
            assert offsets[0] == committed, "A must resume exactly at B's committed offset"
            assert offsets == list(range(committed, end[tp.partition]))
        await a.commit()
    finally:
        await a.stop()

    final = await committed_offsets(kafka_bootstrap, group, topic, 4)
    assert {p: final[p] or 0 for p in range(4)} == end


# ------------------------------------------------------------------------------- (c) manual commit


async def test_manual_commit_after_processing_is_where_the_group_resumes(
    embedded_broker: EmbeddedBroker, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic, group = f"{topic_prefix}.jobs", f"{topic_prefix}.g"
    await embedded_broker.create_topics({topic: 1})
    async with producer(kafka_bootstrap) as prod:
        for i in range(10):
            await prod.send_and_wait(topic, f"job{i}".encode(), key=b"same")
    tp = TopicPartition(topic, 0)

    first = group_consumer(kafka_bootstrap, group, topic)
    await first.start()
    try:
        processed = 0
        while processed < 6:
            record = await asyncio.wait_for(first.getone(), 20)
            # nothing is committed behind our back: the group is exactly at our last commit
            assert await first.committed(tp) == (record.offset or None)
            # "process", then commit exactly past this record
            await first.commit({tp: record.offset + 1})
            processed += 1
        # read, but do not commit, the rest: a crash here must redeliver them
        await asyncio.wait_for(first.getone(), 20)
        assert await first.committed(tp) == 6
    finally:
        await first.stop()

    # Same group, partition assigned by hand: it starts from the group's committed offset. (Joining the
    # group instead works too, see the rebalance test, but on Tansu a member that joins right after the
    # last one left waits about session timeout + 3 s.)
    second = group_consumer(kafka_bootstrap, group)
    second.assign([tp])
    await second.start()
    try:
        record = await asyncio.wait_for(second.getone(), 30)
        assert (record.offset, record.value) == (6, b"job6")
    finally:
        await second.stop()


# ------------------------------------------------------------------------------------- (d) FastStream


def faststream_broker(bootstrap: str) -> KafkaBroker:
    """FastStream broker with the services' producer options; short graceful timeout for tests."""
    return KafkaBroker(bootstrap, graceful_timeout=5.0, **producer_options(idempotent=False))


async def test_faststream_commits_after_handler_and_publishes_key_and_headers(
    embedded_broker: EmbeddedBroker, kafka_bootstrap: str, topic_prefix: str
) -> None:
    source, sink, group = f"{topic_prefix}.in", f"{topic_prefix}.out", f"{topic_prefix}.g"
    await embedded_broker.create_topics({sink: 4})
    broker = faststream_broker(kafka_bootstrap)
    out = broker.publisher(sink)
    entered, gate = asyncio.Event(), asyncio.Event()
    handled: list[tuple[int, int, bytes, dict[str, str]]] = []

    # Topic(...) makes FastStream declare the topic with 4 partitions (a bare name would get 1 on Tansu).
    @broker.subscriber(
        Topic(source, num_partitions=4),
        group_id=group,
        max_workers=2,
        **subscriber_options(**FAST_GROUP),
    )
    async def handle(body: bytes, msg: KafkaMessage) -> None:
        record = msg.raw_message
        assert not isinstance(record, tuple)
        entered.set()
        await gate.wait()
        # Publish (acknowledged by the broker) before returning: the commit comes after this.
        await out.publish(body.upper(), key=record.key, headers={"request-id": msg.headers["request-id"]})
        handled.append((record.partition, record.offset, record.key, dict(msg.headers)))

    async with broker:
        await broker.start()
        meta = await broker.publish(b"hello", source, key=b"tenant-a", headers={"request-id": "r-1"})
        assert meta.partition == expected_partition(b"tenant-a", 4)

        # While the handler is blocked, the group has committed nothing for that partition.
        await asyncio.wait_for(entered.wait(), 30)
        await asyncio.sleep(0.5)
        assert not handled
        before = await committed_offsets(kafka_bootstrap, group, source, 4)
        assert before[meta.partition] in (None, 0)

        gate.set()
        for i in range(2, 10):
            await broker.publish(f"m{i}".encode(), source, key=f"tenant-{i}".encode(), headers={"request-id": f"r-{i}"})

        async def committed_all() -> bool:
            offsets = await committed_offsets(kafka_bootstrap, group, source, 4)
            return sum(o or 0 for o in offsets.values()) == 9

        await eventually(committed_all, within=30, what="all 9 offsets to be committed")

    assert len(handled) == 9
    first = next(h for h in handled if h[2] == b"tenant-a")
    assert first[:2] == (meta.partition, meta.offset)
    assert first[3]["request-id"] == "r-1"

    reader = group_consumer(kafka_bootstrap, f"{topic_prefix}.reader", sink)
    await reader.start()
    outputs: list[Any] = []
    try:

        async def all_out() -> bool:
            await poll(reader, outputs)
            return len(outputs) >= 9

        await eventually(all_out, within=20, what="the handler's 9 outputs")
    finally:
        await reader.stop()
    hello = next(r for r in outputs if r.key == b"tenant-a")
    assert hello.value == b"HELLO"
    assert dict(hello.headers)["request-id"] == b"r-1"
    # Same key and partition count on both topics: the output lands on the same partition number.
    for record in outputs:
        assert record.partition == expected_partition(record.key, 4)


async def test_faststream_ack_policy_commits_even_when_the_handler_raises(
    embedded_broker: EmbeddedBroker, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """AckPolicy.ACK commits a failed message too: handlers must send bad input to the DLQ themselves."""
    source, group = f"{topic_prefix}.in", f"{topic_prefix}.g"
    await embedded_broker.create_topics({source: 1})
    broker = faststream_broker(kafka_bootstrap)
    calls: list[bytes] = []

    @broker.subscriber(source, group_id=group, **subscriber_options(**FAST_GROUP))
    async def handle(body: bytes) -> None:
        calls.append(body)
        if body == b"poison":
            msg = "bad input"
            raise ValueError(msg)

    async with broker:
        await broker.start()
        await broker.publish(b"poison", source, key=b"k")
        await broker.publish(b"fine", source, key=b"k")

        async def both_committed() -> bool:
            return (await committed_offsets(kafka_bootstrap, group, source, 1))[0] == 2

        await eventually(both_committed, within=30, what="both offsets to be committed")
    assert calls == [b"poison", b"fine"], "the failed message is neither retried nor redelivered"


# ------------------------------------------------------------------------------ (f) a hung broker


async def test_producer_and_consumer_recover_after_broker_freeze(tmp_path: Path) -> None:
    """SIGSTOP the broker for 5 s (shorter than request_timeout_ms), then SIGCONT.

    Observed on Tansu: the send issued during the freeze simply waits and completes right after the
    thaw, the consumer receives it, commits succeed, and the group does not rebalance (the broker's
    clock for session expiry was stopped too; a real Kafka broker that hangs would be similar, a network
    partition of the client would not).
    """
    async with EmbeddedBroker(log_dir=tmp_path) as broker:
        topic, group = "frozen", "frozen.g"
        await broker.create_topics({topic: 4})
        async with producer(broker.bootstrap) as prod:
            consumer = group_consumer(broker.bootstrap, group, topic)
            await consumer.start()
            try:
                await prod.send_and_wait(topic, b"before", key=b"k")
                record = await asyncio.wait_for(consumer.getone(), 30)
                assert record.value == b"before"
                await consumer.commit()
                assignment = consumer.assignment()

                broker.freeze()
                try:
                    frozen_at = time.monotonic()
                    delivery = await prod.send(topic, b"during", key=b"k")
                    receive = asyncio.ensure_future(consumer.getone())
                    await asyncio.sleep(5)
                    assert not delivery.done(), "nothing can be acknowledged by a stopped broker"
                    assert not receive.done()
                finally:
                    broker.thaw()

                meta = await asyncio.wait_for(delivery, 15)
                record = await asyncio.wait_for(receive, 15)
                recovered_after = time.monotonic() - frozen_at
                assert record.value == b"during"
                assert record.offset == meta.offset
                assert recovered_after < 8
                await consumer.commit()
                assert await consumer.committed(TopicPartition(topic, meta.partition)) == meta.offset + 1
                assert consumer.assignment() == assignment

                await prod.send_and_wait(topic, b"after", key=b"k")
                record = await asyncio.wait_for(consumer.getone(), 15)
                assert record.value == b"after"
            finally:
                await consumer.stop()
