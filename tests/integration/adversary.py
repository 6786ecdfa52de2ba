"""Shared pieces of the adversarial and "exactly one terminal message" tests (no tests here).

The attacker speaks plain Kafka (aiokafka), as a hostile tenant or a careless producer would: it chooses
ids, keys, partitions, reply topics and raw bytes itself, and never goes through frugalstream's client.
The readers keep listening for a quiet period after the last first answer, so a late second (distinct)
answer to a request fails a test instead of arriving after it stopped looking (issue 19).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Hashable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, DeadLetter, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t
from tests.integration.test_faults_helpers import read_physical

K = TypeVar("K", bound=Hashable)
#: Identity of a request: (tenant, request id).
Key = tuple[str, str]


def ask(rid: str, text: str, tenant: str = "acme", *, system: str | None = None, **kw: Any) -> LLMRequest:
    """A one-question request (optionally with a system prompt); `kw` sets any other request field."""
    messages = ((ChatMessage(role="system", content=system),) if system is not None else ()) + (
        ChatMessage(role="user", content=text),)
    return LLMRequest(id=rid, tenant=tenant, messages=messages, **kw)


class Attacker:
    """An aiokafka producer that writes whatever it is told, where it is told (no prefix added for raw)."""

    def __init__(self, settings: Settings, *, max_request_size: int = 1_048_576) -> None:
        self.settings = settings
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=False,
                                          acks="all", linger_ms=0, max_request_size=max_request_size)

    async def __aenter__(self) -> Attacker:
        await self._producer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._producer.stop()

    async def request(self, *requests: LLMRequest, key: bytes | None = None) -> None:
        """Each request on `llm.requests`, keyed by its id unless `key` is given, acknowledged in order."""
        for req in requests:
            stamped = req.model_copy(update={"created_at": time.time()})
            await self.raw(t.REQUESTS, stamped.model_dump_json().encode(), key=key or req.id.encode())

    async def raw(self, topic: str, value: bytes, *, key: bytes | None = None) -> tuple[int, int]:
        """Raw bytes on a logical topic; returns (partition, offset) of the acknowledged record."""
        meta = await self._producer.send_and_wait(self.settings.topic(topic), value, key=key)
        return meta.partition, meta.offset


async def read_quietly(settings: Settings, topic: str, *, want: set[K], key_of: Callable[[LLMResponse], K],
                       timeout_s: float, quiet_s: float) -> dict[K, list[LLMResponse]]:
    """Distinct responses per key on `topic` (a physical name), read from the start.

    Reads until every wanted key has a first answer (or `timeout_s` passes), then keeps reading for `quiet_s`
    after the last first answer: a late second distinct answer shows up as a second list element. Identical
    copies (at-least-once redelivery of the same bytes) count once; anything that is not an `LLMResponse`
    (another test's garbage) is skipped.
    """
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    got: dict[K, list[LLMResponse]] = {}
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < (quiet_until if quiet_until is not None else deadline):
            for records in (await consumer.getmany(timeout_ms=200, max_records=1000)).values():
                for rec in records:
                    try:
                        response = LLMResponse.model_validate_json(rec.value)
                    except (ValidationError, ValueError, TypeError):
                        continue
                    canonical = response.model_dump_json()
                    if canonical in seen:
                        continue
                    seen.add(canonical)
                    got.setdefault(key_of(response), []).append(response)
            if quiet_until is None and want <= set(got):
                quiet_until = time.monotonic() + quiet_s
    finally:
        await consumer.stop()
    return got


async def collect_terminal(settings: Settings, want: Iterable[Key], *, timeout_s: float = 60.0,
                           quiet_s: float = 2.0, topic: str = t.RESPONSES) -> dict[Key, list[LLMResponse]]:
    """(tenant, request id) -> distinct terminal messages on a logical topic, with a quiet period."""
    return await read_quietly(settings, settings.topic(topic), want=set(want),
                              key_of=lambda r: (r.tenant, r.request_id), timeout_s=timeout_s, quiet_s=quiet_s)


def only(got: dict[Key, list[LLMResponse]], tenant: str, rid: str) -> LLMResponse:
    """The one terminal message of (tenant, rid): fails if it has none or two distinct ones."""
    answers = got.get((tenant, rid), [])
    assert answers, f"({tenant}, {rid}) got no terminal message"
    assert len(answers) == 1, f"({tenant}, {rid}) got {len(answers)} distinct terminal messages: " + "; ".join(
        f"{a.source}/{a.model}/{a.error.code if a.error else ''}" for a in answers)
    return answers[0]


async def read_raw(settings: Settings, physical_topics: Iterable[str], *, timeout_s: float = 5.0,
                   expected: int | None = None) -> list[Any]:
    """Every record of these physical topics from the start: until `expected` records, else for `timeout_s`."""
    return await read_physical(settings, physical_topics, timeout_s=timeout_s,
                               done=lambda records: expected is not None and len(records) >= expected)


async def dead_letters(settings: Settings, topic: str, *, timeout_s: float = 5.0,
                       expected: int | None = None) -> list[DeadLetter]:
    """The dead letters of a logical input topic."""
    records = await read_raw(settings, [settings.topic(t.dlq_topic(topic))], timeout_s=timeout_s, expected=expected)
    return [DeadLetter.model_validate_json(r.value) for r in records]


async def cost_events(settings: Settings, *, timeout_s: float = 10.0, expected: int | None = None,
                      ) -> list[dict[str, Any]]:
    """Cost events (CloudEvents JSON), deduplicated by id."""
    records = await read_raw(settings, [settings.topic(t.COST_EVENTS)], timeout_s=timeout_s, expected=expected)
    return list({e["id"]: e for e in (json.loads(r.value) for r in records)}.values())


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
