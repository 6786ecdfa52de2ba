"""The Python client misused the ways callers misuse clients (closed twice, a failed start, a timeout that cannot
be met, a stop racing a call, started twice, an id or fields that would be dropped), and what it remembers of the
answers it reads on the shared `llm.responses`."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest

from frugalstream.client import kafka as kafka_module
from frugalstream.client.client import FrugalClient, SyncFrugalClient
from frugalstream.client.kafka import KafkaTransport
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse
from tests.unit.test_http_entry import FakePipeline
from tests.unit.test_runtime_hardening import FakeKafka, FakeProducer, FakeReader, kafka, kafka_client, until

__all__ = ["kafka"]  # the fixture, imported for this module's tests

SETTINGS = Settings(kafka_idempotent=False)


def loop_threads() -> int:
    return sum(th.name == "frugalstream-client" and th.is_alive() for th in threading.enumerate())


# --------------------------------------------------------------------------- SyncFrugalClient's lifecycle


def test_a_sync_client_closed_twice_closes_quietly() -> None:
    """`with SyncFrugalClient(...) as c: ... c.close()` closes twice, as files and sockets allow."""
    with SyncFrugalClient("acme", settings=SETTINGS, transport=FakePipeline()) as client:
        assert client.complete("hello").ok
        client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.complete("after close")


def test_a_sync_client_whose_start_fails_ends_its_loop_thread() -> None:
    """The start raises from __enter__, so __exit__ never runs: the loop thread must end with the failure."""

    class Unreachable(FakePipeline):
        async def start(self, on_answer: Any) -> None:
            raise OSError("broker unreachable")

    before = loop_threads()
    with pytest.raises(OSError), SyncFrugalClient("acme", settings=SETTINGS, transport=Unreachable()):
        pass
    assert loop_threads() == before, "the loop thread of a failed start is left running"


def test_a_sync_client_with_a_bad_option_ends_its_loop_thread() -> None:
    before = loop_threads()
    with pytest.raises(TypeError):
        SyncFrugalClient("acme", timeout=5)  # misspelt: timeout_s
    assert loop_threads() == before, "the loop thread of a constructor that raised is left running"


# --------------------------------------------------------------------------- timeouts that cannot be met


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan, math.inf])
async def test_a_timeout_that_cannot_be_met_is_refused_before_anything_is_sent(timeout_s: float) -> None:
    """Sent, the request would be answered and paid for with nobody left to read the answer."""
    pipeline = FakePipeline()
    async with FrugalClient("acme", settings=SETTINGS, transport=pipeline) as client:
        with pytest.raises(ValueError, match="timeout_s"):
            await client.complete("What are your business hours?", timeout_s=timeout_s)
        request = LLMRequest.model_validate({"id": "r1", "tenant": "acme",
                                             "messages": [{"role": "user", "content": "hi"}]})
        with pytest.raises(ValueError, match="timeout_s"):
            await client.ask(request, timeout_s=timeout_s)
        assert pipeline.sent == [] and client.board.pending == 0


@pytest.mark.parametrize("timeout_s", [0.0, -5.0, math.nan])
def test_a_default_timeout_that_cannot_be_met_is_refused_when_the_client_is_made(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        FrugalClient("acme", settings=SETTINGS, transport=FakePipeline(), timeout_s=timeout_s)


# --------------------------------------------------------------------------- KafkaTransport: start twice, stop


async def test_a_client_started_twice_runs_one_producer(kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch) -> None:
    """`await client.start()` then `async with client:` (or a retried start) must not leave a producer running."""
    made: list[Any] = []

    class Producer(FakeProducer):
        stopped = False

        async def stop(self) -> None:
            self.stopped = True

    monkeypatch.setattr(kafka_module, "AIOKafkaProducer", lambda **_: made.append(Producer(kafka)) or made[-1])
    transport = KafkaTransport(SETTINGS)
    client = FrugalClient("acme", settings=SETTINGS, transport=transport)
    await client.start(answers=False)
    await client.start(answers=False)
    await transport.start(None)
    await client.stop()
    assert len(made) == 1 and made[0].stopped


async def test_stopping_while_a_call_starts_the_answer_reader_leaves_no_reader(
    kafka: FakeKafka, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client stops (shutdown) while a call's reader still resolves its positions: a reader kept after
    that polls the answer topic for ever with nobody to stop it."""
    positioning, release = asyncio.Event(), asyncio.Event()

    class SlowReader(FakeReader):
        async def position(self, tp: Any) -> int:
            positioning.set()
            await release.wait()
            return 0

    def reader(**_: Any) -> FakeReader:
        kafka.readers.append(SlowReader(kafka))
        return kafka.readers[-1]

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", reader)
    client, transport = kafka_client()
    await client.start(answers=False)
    call = asyncio.create_task(client.complete("hello", timeout_s=5.0))
    try:
        await asyncio.wait_for(positioning.wait(), 2.0)
        await client.stop()
        release.set()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(call, 2.0)
        assert not transport.reading and all(r.stopped for r in kafka.readers) and kafka.sent == []
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await transport.stop()


# --------------------------------------------------------------------------- arguments never silently dropped


async def test_an_empty_request_id_is_refused_not_replaced_by_a_random_one() -> None:
    """The id is the idempotency key: a random one in its place makes every retry a new, paid request."""
    pipeline = FakePipeline()
    async with FrugalClient("acme", settings=SETTINGS, transport=pipeline) as client:
        with pytest.raises(ValueError):
            await client.complete("What are your business hours?", request_id="")
        with pytest.raises(ValueError):
            await client.submit("Fire and forget", request_id="")
        assert pipeline.sent == []


async def test_an_id_or_fields_given_beside_a_whole_request_are_refused() -> None:
    pipeline = FakePipeline()
    request = LLMRequest.model_validate({"id": "r-original", "tenant": "acme",
                                         "messages": [{"role": "user", "content": "hi"}]})
    async with FrugalClient("acme", settings=SETTINGS, transport=pipeline) as client:
        with pytest.raises(ValueError, match="request_id, reply_topic"):
            await client.submit(request, request_id="r-mine", reply_topic="acme.answers")
        with pytest.raises(ValueError, match="tags"):
            await client.complete(request, tags={"team": "web"})
        assert pipeline.sent == []
        assert await client.submit(request) == "r-original", "a whole request alone is sent as it is"


# --------------------------------------------------------------------------- what the client remembers


def other_callers_answer(i: int, body: str = "x" * 100_000) -> tuple[LLMResponse, int]:
    answer = LLMResponse(request_id=f"r{i}", tenant="globex", source="llm", content=body, responded_at=time.time())
    return answer, len(answer.model_dump_json())


async def test_a_client_remembers_no_answer_nobody_asked_it_for() -> None:
    """Every answer of every tenant streams past on `llm.responses`: an acme client asking nothing held 29 MiB
    of globex's answers."""
    async with FrugalClient("acme", settings=SETTINGS, transport=FakePipeline()) as client:
        for i in range(300):
            client._on_answer(*other_callers_answer(i))
        assert client.board.recent("globex", "r0") is None and client.board._recent_bytes == 0


async def test_an_answer_that_comes_after_its_caller_gave_up_is_replayed_to_its_retry() -> None:
    pipeline = FakePipeline()
    async with FrugalClient("acme", settings=SETTINGS, transport=pipeline) as client:
        pipeline.hold = True
        with pytest.raises(TimeoutError):
            await client.complete("slow question", request_id="r-slow", timeout_s=0.01)
        pipeline.answer(pipeline.sent[-1])  # the answer comes late
        again = await client.complete("slow question", request_id="r-slow", timeout_s=1.0)
        assert again.ok and again.tenant == "acme" and len(pipeline.sent) == 1, "asked again instead of replayed"


async def test_the_http_entry_remembers_answers_of_calls_another_entry_sent(kafka: FakeKafka) -> None:
    """Behind a load balancer, a retry may reach an entry that did not send the call: it replays the answer it
    read (the HTTP entry remembers every answer, unlike a plain client)."""
    from frugalstream.http_entry.server import http_entry

    async with http_entry(Settings(kafka_idempotent=False), host="127.0.0.1", port=0) as running:
        elsewhere = LLMRequest.model_validate({"id": "ns.key-1", "tenant": "tenant-a",
                                               "messages": [{"role": "user", "content": "hi"}]})
        kafka.answer(elsewhere)
        board = running.entry.client.board
        await until(lambda: board.recent("tenant-a", "ns.key-1") is not None)
        assert board.recent("tenant-a", "ns.key-1") is not None
