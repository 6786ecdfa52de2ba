"""The stage and the publisher: no single message, output or failed publish can wedge a partition.

Fakes stand in for Kafka: a broker that records what it is asked to publish (and refuses what a real producer
would refuse), a consumer that records pauses, and FastStream's TestKafkaBroker for whole batches.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, TestKafkaBroker
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from frugalstream.runtime.broker import batch_subscriber_options
from frugalstream.runtime.messaging import Publisher, dead_letter
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, subscribe
from frugalstream.schemas import CacheKeys, ChatMessage, DeadLetter, LLMRequest, LLMResponse, Route, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.responses import error_response

LIMIT = 1_000_000


class MessageTooLarge(Exception):
    """What aiokafka raises for a record over max_request_size."""


@dataclass
class FakeBroker:
    """Records every publish; refuses records a real producer would refuse; fails or hangs named topics."""

    max_request_size: int = 2 * LIMIT
    fail: set[str] = field(default_factory=set)
    hang: set[str] = field(default_factory=set)
    sent: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)

    async def publish(self, data: bytes | None, topic: str, *, key: bytes | None = None,
                      partition: int | None = None, headers: dict[str, str] | None = None) -> None:
        if topic in self.hang:
            await asyncio.Event().wait()
        if topic in self.fail:
            raise ConnectionError(f"broker refused {topic}")
        if data is not None and len(data) > self.max_request_size:
            raise MessageTooLarge(len(data))
        self.sent.append((topic, key, data))

    def on(self, topic: str) -> list[bytes]:
        return [data for name, _, data in self.sent if name == topic and data is not None]


def settings() -> Settings:
    return Settings(kafka_idempotent=False, max_message_bytes=LIMIT)


def publisher(broker: FakeBroker, **kwargs: Any) -> Publisher:
    return Publisher(broker, settings(), Metrics(CollectorRegistry()), **kwargs)  # type: ignore[arg-type]


def request(rid: str = "r1", content: str = "hello?", reply_topic: str | None = None) -> LLMRequest:
    return LLMRequest(id=rid, tenant="acme", messages=(ChatMessage(role="user", content=content),),
                      reply_topic=reply_topic)


def routed(req: LLMRequest) -> RoutedRequest:
    return RoutedRequest(
        request=req, route=Route(tier="small", model="gpt-4o-mini", provider="openai", baseline_model="gpt-4o",
                                 task_type="faq", reason="test", input_tokens=10, full_input_tokens=10),
        keys=CacheKeys(scope="scope-1", exact="exact-1", prefix="p", lookup_text=req.messages[-1].content,
                       tier_rank=0),
        routed_at=time.time(),
    )


def response(req: LLMRequest, content: str = "hi") -> LLMResponse:
    return LLMResponse(request_id=req.id, tenant=req.tenant, source="llm", content=content, responded_at=time.time())


def record(value: bytes | None, *, offset: int = 0, key: bytes | None = b"k", topic: str = t.REQUESTS,
           headers: tuple[tuple[str, bytes], ...] = ()) -> Record:
    return Record(topic, 0, offset, key, value, headers)


def fits(data: bytes) -> bool:
    return len(data) < 0.9 * LIMIT


# --------------------------------------------------------------------------- dead letters are capped


def test_dead_letter_of_a_5mb_value_is_truncated_with_its_size_and_hash() -> None:
    value = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB
    out = dead_letter(record(value, key=b"k" * 100_000), ValueError("e" * 1_000_000), "classifier", max_bytes=LIMIT)
    letter = out.value
    assert isinstance(letter, DeadLetter)
    data = letter.model_dump_json().encode()
    assert fits(data), f"the dead letter is {len(data)} bytes"
    assert letter.truncated and letter.value_size == len(value)
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
    copied = base64.b64decode(letter.value_b64)
    assert value.startswith(copied) and len(copied) > LIMIT // 2, "as much of the value as fits, from the start"
    assert len(letter.error) <= 4000
    assert out.key is not None and len(out.key) <= 1024


def test_small_dead_letter_keeps_the_whole_value() -> None:
    letter = dead_letter(record(b"not json"), ValueError("bad"), "classifier", max_bytes=LIMIT).value
    assert isinstance(letter, DeadLetter)
    assert not letter.truncated and base64.b64decode(letter.value_b64) == b"not json" and letter.value_size == 8


def test_dead_letter_with_huge_headers_still_fits() -> None:
    headers = tuple((f"h{i}", b"v" * 10_000) for i in range(500))
    letter = dead_letter(record(b"x" * 3_000_000, headers=headers), ValueError("bad"), "s", max_bytes=LIMIT).value
    assert isinstance(letter, DeadLetter)
    assert fits(letter.model_dump_json().encode())


async def publish_letters(pub: Publisher, failures: list[tuple[Record, Exception]]) -> None:
    """What the stage does with a batch's failures: capped letters, published with the batch's outputs."""
    await pub.publish_all(await pub.capped_letters(failures, "classifier"), service="classifier")


async def test_a_5mb_record_dead_letters_in_one_go() -> None:
    """Today's bug: the letter's base64 copy exceeds the producer limit and the stage retries forever."""
    broker = FakeBroker()
    pub = publisher(broker)
    await publish_letters(pub, [(record(b"x" * 5_000_000), ValueError("too big"))])
    (data,) = broker.on(f"{t.REQUESTS}.dlq")
    assert fits(data)


# --------------------------------------------------------------------------- sizes are checked before publishing


async def test_oversize_response_becomes_one_too_large_error_on_responses_and_reply_topic() -> None:
    broker = FakeBroker()
    req = request(reply_topic="acme.replies")
    huge = response(req, content="a" * 1_500_000)  # fits the producer (2 MB) but not the consumers (1 MB)
    await publisher(broker).publish_all(response_outs(huge, req, "scope-1"))
    assert all(len(d) <= LIMIT for _, _, d in broker.sent if d is not None), "never sent as is"
    (main,) = [LLMResponse.model_validate_json(d) for d in broker.on(t.RESPONSES)]
    (copy,) = [LLMResponse.model_validate_json(d) for d in broker.on("acme.replies")]
    assert main.error is not None and main.error.code == "too_large" and main.request_id == req.id
    assert copy == main, "one distinct terminal message, copied"


async def test_oversize_routed_request_becomes_a_too_large_error_for_its_request() -> None:
    """A valid ~1 MB request doubles once routed (the lookup text copies the prompt)."""
    broker = FakeBroker()
    req = request(content="q" * 600_000)
    await publisher(broker).publish_all([Out(t.ROUTED, routed(req), key="scope-1")])
    assert broker.on(t.ROUTED) == []
    (answer,) = [LLMResponse.model_validate_json(d) for d in broker.on(t.RESPONSES)]
    assert answer.error is not None and answer.error.code == "too_large" and answer.request_id == req.id
    assert [k for name, k, _ in broker.sent if name == t.RESPONSES] == [b"scope-1"], "co-partitioned key kept"


async def test_oversize_other_output_is_dead_lettered_capped() -> None:
    broker = FakeBroker()
    entry = routed(request(content="w" * 700_000))  # on a state topic: no request to answer there
    await publisher(broker).publish_all([Out(t.DEDUPE_WAITING, entry, key="r1", partition=2)], service="dedupe")
    assert broker.on(t.DEDUPE_WAITING) == [] and broker.on(t.RESPONSES) == []
    (data,) = broker.on(f"{t.DEDUPE_WAITING}.dlq")
    letter = DeadLetter.model_validate_json(data)
    assert fits(data) and letter.truncated and letter.topic == t.DEDUPE_WAITING and letter.service == "dedupe"
    assert letter.value_size is not None and letter.value_size > LIMIT


async def test_large_batches_are_serialized_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import frugalstream.runtime.messaging as messaging

    offloaded: list[int] = []
    to_thread = asyncio.to_thread

    async def spy(func: Any, *args: Any) -> Any:
        offloaded.append(len(args[0]) if args and isinstance(args[0], Sequence) else 1)
        return await to_thread(func, *args)

    monkeypatch.setattr(messaging.asyncio, "to_thread", spy)
    broker = FakeBroker()
    outs = [Out(t.RESPONSES, response(request(f"r{i}"), content="c" * 100_000), key=f"r{i}") for i in range(10)]
    await publisher(broker).publish_all(outs)
    assert offloaded and sum(offloaded) >= 5, "most of a 1 MB batch is serialized on a worker thread"
    assert len(broker.on(t.RESPONSES)) == 10


# --------------------------------------------------------------------------- side publishes degrade


async def test_failed_reply_copy_is_logged_and_counted_and_does_not_fail_the_batch() -> None:
    broker = FakeBroker(fail={"acme.typo"})
    pub = publisher(broker)
    req = request(reply_topic="acme.typo", content="secret prompt")
    with capture_logs() as logs:
        await pub.publish_all(response_outs(response(req, content="secret answer"), req, None))
    assert len(broker.on(t.RESPONSES)) == 1
    (event,) = [e for e in logs if e["event"] == "reply_publish_failed"]
    assert event["topic"] == "acme.typo" and event["request_id"] == req.id
    assert "secret" not in repr(logs), "never content"
    assert pub.metrics.best_effort_failures.labels("reply")._value.get() == 1


async def test_reply_copy_to_a_topic_that_never_answers_is_bounded() -> None:
    broker = FakeBroker(hang={"acme.missing"})
    req = request(reply_topic="acme.missing")
    started = time.monotonic()
    publishing = publisher(broker, best_effort_timeout_s=0.2).publish_all(response_outs(response(req), req, None))
    await asyncio.wait_for(publishing, timeout=5.0)
    assert time.monotonic() - started < 2.0
    assert len(broker.on(t.RESPONSES)) == 1


async def test_failed_dead_letter_publish_is_logged_and_counted_not_raised() -> None:
    broker = FakeBroker(fail={f"{t.REQUESTS}.dlq"})
    pub = publisher(broker)
    with capture_logs() as logs:
        await publish_letters(pub, [(record(b"bad", offset=7), ValueError("x"))])
    (event,) = [e for e in logs if e["event"] == "dead_letter_publish_failed"]
    assert event["offset"] == 7 and event["topic"] == t.REQUESTS
    assert pub.metrics.best_effort_failures.labels("dead_letter")._value.get() == 1


async def test_failed_primary_publish_raises() -> None:
    broker = FakeBroker(fail={t.RESPONSES})
    req = request()
    with pytest.raises(ConnectionError):
        await publisher(broker).publish_all(response_outs(response(req), req, None))


# --------------------------------------------------------------------------- the stage, driven directly


@dataclass
class FakeConsumer:
    paused: list[tuple[str, int]] = field(default_factory=list)
    resumed: list[tuple[str, int]] = field(default_factory=list)

    def pause(self, *tps: Any) -> None:
        self.paused.extend((tp.topic, tp.partition) for tp in tps)

    def resume(self, *tps: Any) -> None:
        self.resumed.extend((tp.topic, tp.partition) for tp in tps)

    def seek(self, tp: Any, offset: int) -> None:
        pass

    def assignment(self) -> set[Any]:
        from aiokafka import TopicPartition

        return {TopicPartition(t.REQUESTS, p) for p in range(4)}


@dataclass
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeMessage:
    raw_message: tuple[FakeRecord, ...]
    consumer: FakeConsumer


class CapturingBroker:
    """Stands in for KafkaBroker.subscriber: keeps the handlers (the last one, and each by topic) so a test can
    call them with a fake message."""

    def __init__(self) -> None:
        self.handler: Any = None
        self.handlers: dict[str, Any] = {}
        self.options: dict[str, Any] = {}

    def subscriber(self, *topics: str, **options: Any) -> Any:
        self.options = options

        def register(func: Any) -> Any:
            self.handler = func
            self.handlers.update(dict.fromkeys(topics, func))
            return func

        return register


def stage(process: Any, broker: FakeBroker, on_invalid: Any = None) -> tuple[Any, Publisher]:
    capturing = CapturingBroker()
    pub = publisher(broker)
    subscribe(capturing, pub, settings(), service="classifier", topic=t.REQUESTS,  # type: ignore[arg-type]
              model=LLMRequest, process=process, on_invalid=on_invalid)
    return capturing.handler, pub


def batch(*values: bytes, partition: int = 0) -> FakeMessage:
    return FakeMessage(tuple(FakeRecord(t.REQUESTS, partition, i, b"k", v) for i, v in enumerate(values)),
                       FakeConsumer())


async def answer_all(items: Sequence[Decoded[LLMRequest]], _ctx: BatchContext) -> list[Out]:
    outs: list[Out] = []
    for item in items:
        if "poison" in item.value.messages[-1].content:
            raise RuntimeError("cannot process this one")
        outs.extend(response_outs(response(item.value), item.value, None))
    return outs


async def test_poison_record_in_a_mixed_batch_is_the_only_one_dead_lettered() -> None:
    broker = FakeBroker()
    handler, _ = stage(answer_all, broker)
    reqs = [request("a"), request("b", content="poison"), request("c")]
    with capture_logs() as logs:
        await handler(batch(*(r.model_dump_json().encode() for r in reqs)))
    answers = {r.request_id: r for r in (LLMResponse.model_validate_json(d) for d in broker.on(t.RESPONSES))}
    assert answers["a"].ok and answers["c"].ok, "the rest of the batch is answered"
    assert answers["b"].error is not None and answers["b"].error.code == "delivery_failed", "one terminal for it"
    letters = [DeadLetter.model_validate_json(d) for d in broker.on(f"{t.REQUESTS}.dlq")]
    assert [letter.offset for letter in letters] == [1], "only the poison record is dead-lettered"
    failed = [e for e in logs if e["event"] == "record_failed"]
    assert failed and failed[0]["offset"] == 1 and failed[0].get("exc_info"), "logged with its traceback"


async def test_invalid_records_get_on_invalid_outputs_and_are_still_dead_lettered() -> None:
    broker = FakeBroker()
    seen: list[int] = []

    def on_invalid(rec: Record, exc: Exception) -> list[Out]:
        seen.append(rec.offset)
        req = request(f"bad-{rec.offset}")
        return response_outs(error_response(req, "invalid_request", "not a request"), req, None)

    handler, _ = stage(answer_all, broker, on_invalid)
    await handler(batch(b"{nope", request("ok").model_dump_json().encode(), b"\xff"))
    assert seen == [0, 2]
    ids = sorted(LLMResponse.model_validate_json(d).request_id for d in broker.on(t.RESPONSES))
    assert ids == ["bad-0", "bad-2", "ok"]
    assert sorted(DeadLetter.model_validate_json(d).offset or 0 for d in broker.on(f"{t.REQUESTS}.dlq")) == [0, 2]


async def test_on_invalid_that_raises_does_not_wedge_the_partition() -> None:
    broker = FakeBroker()

    def on_invalid(rec: Record, exc: Exception) -> list[Out]:
        raise KeyError("bug in the hook")

    handler, _ = stage(answer_all, broker, on_invalid)
    with capture_logs() as logs:
        await handler(batch(b"{nope", request("ok").model_dump_json().encode()))  # does not raise
    assert [LLMResponse.model_validate_json(d).request_id for d in broker.on(t.RESPONSES)] == ["ok"]
    assert len(broker.on(f"{t.REQUESTS}.dlq")) == 1
    assert any(e["event"] == "on_invalid_failed" and e.get("exc_info") for e in logs)


async def test_failed_publish_raises_and_pauses_with_exponential_capped_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = FakeBroker(fail={t.RESPONSES})
    handler, pub = stage(answer_all, broker)
    delays: list[float] = []
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "call_later", lambda delay, *args: delays.append(delay))
    msg = batch(request("a").model_dump_json().encode(), partition=3)
    for _ in range(9):
        with pytest.raises(ConnectionError):  # raising is the NACK: the batch is not committed
            await handler(msg)
    assert msg.consumer.paused == [(t.REQUESTS, 3)] * 9, "the batch's partitions are paused, not spun on"
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert pub.metrics.publish_backoffs.labels("classifier")._value.get() == 9
    broker.fail.clear()
    await handler(msg)  # the redelivered batch goes through, and the backoff starts over
    broker.fail.add(t.RESPONSES)
    with pytest.raises(ConnectionError):
        await handler(msg)
    assert delays[-1] == 0.5


def test_subscriber_commits_only_after_the_handler_returns() -> None:
    options = batch_subscriber_options(settings(), "classifier")
    assert options["ack_policy"] is AckPolicy.NACK_ON_ERROR
    broker = KafkaBroker()
    subscribe(broker, Publisher(broker, settings()), settings(), service="classifier", topic=t.REQUESTS,
              model=LLMRequest, process=answer_all)
    (sub,) = broker.subscribers
    assert sub.ack_policy is AckPolicy.NACK_ON_ERROR
    assert sub._connection_args["enable_auto_commit"] is False  # type: ignore[attr-defined]


async def test_with_a_failing_publisher_the_handler_raises_so_nothing_is_committed() -> None:
    broker = KafkaBroker()
    pub = Publisher(broker, settings())
    subscribe(broker, pub, settings(), service="classifier", topic=t.REQUESTS, model=LLMRequest,
              process=answer_all)

    async def failing(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    async with TestKafkaBroker(broker) as test_broker:
        pub._send = failing  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await test_broker.publish(request("a").model_dump_json().encode(), t.REQUESTS, key=b"k")


def test_broker_has_a_real_logger() -> None:
    """With `logger=None` FastStream swallowed every handler exception and client error without a line."""
    from faststream._internal.context import ContextRepo

    from frugalstream.runtime.broker import BROKER_LOGGER, make_broker

    state = make_broker(settings()).config.logger
    assert state.params_storage.get_logger(context=ContextRepo()) is BROKER_LOGGER
