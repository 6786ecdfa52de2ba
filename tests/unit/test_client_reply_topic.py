"""A client with a reply topic names it on every request and reads its answers there, never on `llm.responses`,
which carries every tenant's answers: what a principal granted only its own tenant's topics can use."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import TopicPartition

from frugalstream.client import kafka as kafka_module
from frugalstream.client.client import FrugalClient
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest
from frugalstream.schemas import topics as t
from tests.unit.test_runtime_hardening import FakeKafka, FakeReader, kafka

__all__ = ["kafka"]  # the fixture, imported for this module's tests

SETTINGS = Settings(kafka_idempotent=False)


class RecordingReader(FakeReader):
    def __init__(self, fake: FakeKafka) -> None:
        super().__init__(fake)
        self.assigned: list[TopicPartition] = []

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = list(tps)


@pytest.fixture
def readers(kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch) -> list[RecordingReader]:
    made: list[RecordingReader] = []

    def reader(**_: Any) -> RecordingReader:
        made.append(RecordingReader(kafka))
        kafka.readers.append(made[-1])
        return made[-1]

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", reader)
    return made


async def test_answers_are_read_on_the_reply_topic_each_request_names(kafka: FakeKafka,
                                                                      readers: list[RecordingReader]) -> None:
    async with FrugalClient("acme", settings=SETTINGS, reply_topic="acme.replies") as client:
        answer = await client.complete("What are your business hours?", timeout_s=5)
        request_id = await client.submit("And on Sundays?")
    assert answer.ok
    assert [r.reply_topic for r in kafka.sent] == ["acme.replies", "acme.replies"]
    assert kafka.sent[1].id == request_id
    assert {tp.topic for r in readers for tp in r.assigned} == {"acme.replies"}


async def test_without_a_reply_topic_the_client_reads_llm_responses(kafka: FakeKafka,
                                                                    readers: list[RecordingReader]) -> None:
    async with FrugalClient("acme", settings=SETTINGS) as client:
        assert (await client.complete("hello", timeout_s=5)).ok
    assert kafka.sent[0].reply_topic is None
    assert {tp.topic for r in readers for tp in r.assigned} == {t.RESPONSES}


async def test_a_request_naming_another_reply_topic_is_refused_before_it_is_sent(
        kafka: FakeKafka, readers: list[RecordingReader]) -> None:
    async with FrugalClient("acme", settings=SETTINGS, reply_topic="acme.replies") as client:
        with pytest.raises(ValueError, match=r"acme\.replies"):
            await client.complete("hello", reply_topic="acme.other", timeout_s=5)
        whole = LLMRequest(id="r1", tenant="acme", messages=({"role": "user", "content": "hi"},))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reply_topic"):
            await client.ask(whole, timeout_s=5)  # its answer would never come where this client reads
        named = whole.model_copy(update={"reply_topic": "acme.replies"})
        assert (await client.ask(named, timeout_s=5)).ok
    assert [r.id for r in kafka.sent] == ["r1"]
