"""Four holes a review found in the runtime and the client, each closed and kept closed:

* a request whose `sampling` is not an object (5, true, [1]) raised a bare TypeError out of the contract's
  before-validator, which decoding did not catch: the batch was redelivered (or retried in flight) for ever, its
  good records never answered, nothing dead-lettered;
* the commit tracker took any gap in offsets (a transaction marker, compaction) for a rewind and forgot the
  batches in flight, so a later batch committed past one still running (lost on a crash);
* the client's answer reader could die unnoticed: waiting callers sat out their whole timeout, later calls
  sent requests nobody could see answered;
* the client kept one timestamp per answer it ever delivered (memory without bound on a long-lived client).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import BaseModel, ValidationError, field_validator

from frugalstream.client import answers as answers_module
from frugalstream.client import kafka as kafka_module
from frugalstream.client.answers import AnswerBoard
from frugalstream.client.client import FrugalClient
from frugalstream.client.kafka import KafkaTransport, OnAnswer
from frugalstream.runner import RunningServices
from frugalstream.runtime.inflight import CommitTracker, InFlight
from frugalstream.runtime.messaging import decode
from frugalstream.runtime.records import Record
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import subscribe
from frugalstream.schemas import DeadLetter, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.schemas.topics import dlq_topic
from tests.unit.test_inflight import Consumer, records
from tests.unit.test_pipeline_inmemory import InMemoryCluster
from tests.unit.test_stage import (
    CapturingBroker,
    FakeBroker,
    FakeConsumer,
    FakeMessage,
    FakeRecord,
    answer_all,
    batch,
    publisher,
    request,
    settings,
    stage,
)

# --------------------------------------------------------------------------- a request of the wrong JSON shape

#: `sampling` values of the wrong JSON type; the list of pairs used to pass as `{"seed": 1}` (dict() took it).
NOT_OBJECTS = [5, True, [1], [["seed", 1]], "temperature", 0, False]


def with_sampling(sampling: Any, rid: str = "p", **top_level: Any) -> bytes:
    body = request(rid).model_dump(mode="json") | {"sampling": sampling, **top_level}
    return json.dumps(body).encode()


@pytest.mark.parametrize("sampling", NOT_OBJECTS, ids=repr)
@pytest.mark.parametrize("top_level", [{}, {"temperature": 0.5}], ids=["alone", "with-top-level-field"])
def test_a_sampling_that_is_not_an_object_is_a_validation_error(sampling: Any, top_level: dict[str, Any]) -> None:
    """The contract's own error (dead-lettered, answered `invalid_request`), never a bare TypeError, and never
    accepted: a falsy value used to vanish into the top-level fields' sampling."""
    with pytest.raises(ValidationError, match="sampling must be an object"):
        LLMRequest.model_validate_json(with_sampling(sampling, **top_level))


class _Picky(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def _unlucky(cls, n: int) -> int:
        if n == 13:
            raise LookupError("a validator with a bug")  # not a ValueError: pydantic lets it through
        return n


def test_decoding_turns_any_exception_of_a_record_into_its_failure() -> None:
    """Whatever a contract's validators raise, `decode` never does: the record fails alone."""
    records = [Record("t", 0, o, None, json.dumps({"n": n}).encode(), ()) for o, n in enumerate((1, 13, 2))]
    good, bad = decode(records, _Picky, max_bytes=1_000_000)
    assert [d.value.n for d in good] == [1, 2]
    assert [(rec.offset, type(exc)) for rec, exc in bad] == [(1, LookupError)]


@pytest.mark.parametrize("sampling", [5, True, [1]], ids=repr)
async def test_a_record_with_a_non_object_sampling_is_dead_lettered_once_and_its_neighbours_answered(
    sampling: Any,
) -> None:
    broker = FakeBroker()
    handler, _ = stage(answer_all, broker)
    await handler(batch(request("a").model_dump_json().encode(), with_sampling(sampling),
                        request("c").model_dump_json().encode()))
    assert sorted(LLMResponse.model_validate_json(d).request_id for d in broker.on(t.RESPONSES)) == ["a", "c"]
    assert [DeadLetter.model_validate_json(d).offset for d in broker.on(dlq_topic(t.REQUESTS))] == [1]


@pytest.mark.parametrize("sampling", [5, True, [1]], ids=repr)
async def test_a_stage_with_batches_in_flight_commits_past_a_non_object_sampling(sampling: Any) -> None:
    """The classifier runs batches in flight (`runtime.inflight`): a batch whose decoding raised was retried,
    with backoff, for ever, holding its partition's commit and never answering its good records."""

    class CommittingConsumer(FakeConsumer):
        def __init__(self) -> None:
            super().__init__()
            self.commits: list[dict[TopicPartition, int]] = []

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            self.commits.append(dict(offsets))

    broker, capturing, consumer = FakeBroker(), CapturingBroker(), CommittingConsumer()
    pub = publisher(broker)
    subscribe(capturing, pub, settings(), service="classifier", topic=t.REQUESTS,  # type: ignore[arg-type]
              model=LLMRequest, process=answer_all, concurrency=2)
    values = (request("a").model_dump_json().encode(), with_sampling(sampling),
              request("c").model_dump_json().encode())
    await capturing.handler(FakeMessage(tuple(FakeRecord(t.REQUESTS, 0, o, b"k", v) for o, v in enumerate(values)),
                                        consumer))
    await pub.drain(2.0)
    assert consumer.commits and consumer.commits[-1] == {TopicPartition(t.REQUESTS, 0): 3}
    assert sorted(LLMResponse.model_validate_json(d).request_id for d in broker.on(t.RESPONSES)) == ["a", "c"]
    assert len(broker.on(dlq_topic(t.REQUESTS))) == 1


async def test_on_the_pipeline_a_non_object_sampling_is_dead_lettered_answered_and_the_flow_goes_on(
    pipeline: RunningServices,
) -> None:
    cluster = InMemoryCluster(pipeline)
    await pipeline.broker.start()
    await cluster.produce(t.REQUESTS, with_sampling(True, rid="poison"), key=b"k")
    await cluster.produce(t.REQUESTS, request("after").model_dump_json().encode(), key=b"k")
    answers = await cluster.answers({"poison", "after"})
    (poison,) = answers["poison"]
    assert poison.error is not None and poison.error.code == "invalid_request", "a terminal answer for it"
    assert answers["after"][0].ok, "the record after it is answered"
    letters = [DeadLetter.model_validate_json(v) for v in await cluster.records([dlq_topic(t.REQUESTS)], 1)]
    assert len(letters) == 1 and "sampling must be an object" in letters[0].error


# --------------------------------------------------------------------------- commits across a gap in offsets


def test_a_gap_in_offsets_is_not_a_rewind_a_later_batch_waits_for_the_one_running() -> None:
    """Offset 5 is a transaction marker: the batch after it starts at 6, and must not commit past 0..4."""
    tracker = CommitTracker()
    first = tracker.begin(records(0, 0, 4))
    second = tracker.begin(records(0, 6, 9))
    third = tracker.begin(records(0, 20, 21))  # compaction removed 10..19
    assert tracker.finish(second) == {}
    assert tracker.finish(third) == {}
    assert tracker.finish(first) == {("t", 0): 22}


async def test_in_flight_nothing_past_a_running_batch_is_committed_across_a_gap() -> None:
    consumer = Consumer({0})
    inflight = InFlight("classifier", limit=4)
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()

    async def fast() -> None:
        return None

    await inflight.submit(records(0, 0, 4), consumer, slow)
    await inflight.submit(records(0, 6, 9), consumer, fast)
    for _ in range(5):
        await asyncio.sleep(0)
    committed_early = list(consumer.commits)
    gate.set()
    await inflight.drain(5)
    assert committed_early == [], "0..4 still ran: a crash then must redeliver them"
    assert consumer.commits == [{TopicPartition("t", 0): 10}]


# --------------------------------------------------------------------------- the client's answer reader dies


class FetchFailed(Exception):
    """What aiokafka's getmany raises on a fatal fetch error."""


class FakeKafka:
    """The aiokafka clients `KafkaTransport` makes, in memory: a request produced is answered (unless `hold`)
    to every answer reader still open; `kill` fails the newest reader's fetch, `refuse` the next one's start."""

    def __init__(self) -> None:
        self.readers: list[FakeReader] = []
        self.sent: list[LLMRequest] = []
        self.hold = False
        self.refuse: BaseException | None = None

    def kill(self, exc: BaseException) -> None:
        self.readers[-1].feed.put_nowait(exc)

    def answer(self, request: LLMRequest) -> None:
        value = LLMResponse(request_id=request.id, tenant=request.tenant, source="llm", content="hi",
                            responded_at=time.time()).model_dump_json().encode()
        for reader in self.readers:
            if not reader.stopped:
                reader.feed.put_nowait(SimpleNamespace(value=value))


class FakeReader:
    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka
        self.feed: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = False

    async def start(self) -> None:
        if self.kafka.refuse is not None:
            raise self.kafka.refuse

    async def topics(self) -> set[str]:
        return {t.RESPONSES}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        pass

    async def position(self, tp: TopicPartition) -> int:
        return 0

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        item = await self.feed.get()
        if isinstance(item, BaseException):
            raise item
        return {TopicPartition(t.RESPONSES, 0): [item]}

    async def stop(self) -> None:
        self.stopped = True


class FakeProducer:
    def __init__(self, kafka: FakeKafka) -> None:
        self.kafka = kafka

    async def start(self) -> None:
        pass

    async def send_and_wait(self, topic: str, data: bytes, key: bytes | None = None) -> None:
        request = LLMRequest.model_validate_json(data)
        self.kafka.sent.append(request)
        if not self.kafka.hold:
            asyncio.get_running_loop().call_soon(self.kafka.answer, request)

    async def stop(self) -> None:
        pass


@pytest.fixture
def kafka(monkeypatch: pytest.MonkeyPatch) -> FakeKafka:
    fake = FakeKafka()

    def reader(**_: Any) -> FakeReader:
        fake.readers.append(FakeReader(fake))
        return fake.readers[-1]

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", reader)
    monkeypatch.setattr(kafka_module, "AIOKafkaProducer", lambda **_: FakeProducer(fake))
    return fake


def kafka_client() -> tuple[FrugalClient, KafkaTransport]:
    transport = KafkaTransport(Settings(kafka_idempotent=False))
    return FrugalClient("acme", settings=Settings(kafka_idempotent=False), transport=transport), transport


async def until(done: Callable[[], bool], within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not done() and time.monotonic() < deadline:  # noqa: ASYNC110 - a condition on fakes' state
        await asyncio.sleep(0.005)


async def test_a_dead_answer_reader_fails_every_waiting_caller_at_once_naming_why(kafka: FakeKafka) -> None:
    client, _ = kafka_client()
    await client.start()
    kafka.hold = True
    calls = [asyncio.create_task(client.complete(f"question {i}", timeout_s=30.0)) for i in range(2)]
    try:
        await until(lambda: len(kafka.sent) == 2)
        kafka.kill(FetchFailed("TopicAuthorizationFailedError: llm.responses"))
        done, _ = await asyncio.wait(calls, timeout=2.0)
        assert len(done) == 2, "the callers still wait (for their 30 s timeout) on a reader that is dead"
        for call in calls:
            error = call.exception()
            assert isinstance(error, ConnectionError) and not isinstance(error, TimeoutError)
            assert "FetchFailed" in str(error) and "TopicAuthorizationFailedError" in str(error)
            assert isinstance(error.__cause__, FetchFailed)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await client.stop()


async def test_the_next_call_after_the_reader_died_starts_a_new_one_and_is_answered(kafka: FakeKafka) -> None:
    client, transport = kafka_client()
    await client.start()
    try:
        assert (await client.complete("before", timeout_s=2.0)).ok
        kafka.kill(FetchFailed("corrupt batch"))
        await until(lambda: transport.reader_failure() is not None)
        answer = await client.complete("after", timeout_s=2.0)  # with the dead reader kept: a 2 s timeout
        assert answer.ok and len(kafka.readers) == 2 and kafka.readers[0].stopped
    finally:
        await client.stop()


async def test_when_no_new_reader_can_start_the_call_fails_at_once_sending_nothing(kafka: FakeKafka) -> None:
    client, transport = kafka_client()
    await client.start()
    try:
        kafka.kill(FetchFailed("TopicAuthorizationFailedError: llm.responses"))
        await until(lambda: transport.reader_failure() is not None)
        kafka.refuse = OSError("broker 127.0.0.1:9092 unreachable")
        started = time.monotonic()
        with pytest.raises(Exception) as caught:
            await client.complete("hello?", timeout_s=2.0)
        assert not isinstance(caught.value, TimeoutError) and "unreachable" in str(caught.value)
        assert time.monotonic() - started < 1.0 and kafka.sent == []
    finally:
        await client.stop()


class LostReaderTransport:
    """A transport whose answer reader died and which starts no new one (`start_reader` keeps the dead one)."""

    def __init__(self) -> None:
        self.on_reader_failure: Callable[[BaseException], object] | None = None
        self.sent: list[LLMRequest] = []

    async def start(self, on_answer: OnAnswer | None) -> None:
        pass

    async def start_reader(self, on_answer: OnAnswer) -> None:
        pass

    def reader_failure(self) -> BaseException | None:
        return FetchFailed("TopicAuthorizationFailedError: llm.responses")

    async def send(self, request: LLMRequest) -> None:
        self.sent.append(request)

    async def stop(self) -> None:
        pass


async def test_with_no_reader_running_a_call_fails_at_once_naming_why_instead_of_sending() -> None:
    transport = LostReaderTransport()
    client = FrugalClient("acme", settings=Settings(kafka_idempotent=False), transport=transport)
    await client.start()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="TopicAuthorizationFailedError"):
        await client.complete("hello?", timeout_s=2.0)
    assert time.monotonic() - started < 1.0 and transport.sent == [], "sent, then waited out its timeout"
    await client.stop()


# --------------------------------------------------------------------------- the client's memory stays bounded


async def test_the_answer_board_keeps_delivery_times_for_its_rate_window_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the HTTP entry reads `answer_rate` (which trimmed them): a plain client kept one per answer."""
    clock = [1000.0]
    monkeypatch.setattr(answers_module.time, "monotonic", lambda: clock[0])
    board = AnswerBoard(rate_window_s=10.0)
    for i in range(5000):
        clock[0] += 0.5  # two answers a second for 40 minutes
        future = board.expect("acme", str(i))
        board.deliver(LLMResponse(request_id=str(i), tenant="acme", source="llm", content="hi",
                                  responded_at=time.time()), 10)
        assert future.done()
    assert len(board._delivered) <= 21, f"{len(board._delivered)} delivery times kept for a 10 s window"
    assert 1.9 <= board.answer_rate() <= 2.1, "still the rate over the window (both ends counted)"


@pytest.mark.parametrize("field", ["created_at", "deadline"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_request_time_that_is_no_number_is_refused(field: str, value: str) -> None:
    """A NaN deadline read as no deadline, and a NaN created_at as no latency: refused at the contract instead."""
    body = '{"id": "r1", "tenant": "acme", "messages": [{"role": "user", "content": "hi"}], '
    raw = body + f'"{field}": {value}' + "}"
    with pytest.raises(ValidationError):
        LLMRequest.model_validate_json(raw)
