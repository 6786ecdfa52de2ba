"""The Kafka side of the client: produce requests to `llm.requests`, read every answer on `llm.responses`.

The answer reader joins no consumer group: it is assigned every partition of the answer topic and starts at
its end, so any number of clients and HTTP entries read side by side without rebalancing each other, and
none commits offsets another depends on. `start` returns only once every partition's position is fixed,
so a request produced after it can never have its answer land before the reader's starting point.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from frugalstream.runtime.broker import aiokafka_security
from frugalstream.runtime.kafka_options import client_options, producer_options
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse
from frugalstream.schemas import topics as t

log = get_logger(__name__)

#: Decoding a fetched batch bigger than this moves to a worker thread, off the event loop.
INLINE_DECODE_BYTES = 256 * 1024

OnAnswer = Callable[[LLMResponse, int], object]


def _decode(records: Sequence[ConsumerRecord[bytes, bytes]]) -> list[tuple[LLMResponse, int]]:
    answers = []
    for rec in records:
        if rec.value is None:
            continue
        try:
            answers.append((LLMResponse.model_validate_json(rec.value), len(rec.value)))
        except ValidationError:
            continue  # not ours to judge: the topic's writers dead-letter their own bad output
    return answers


class KafkaTransport:
    """An aiokafka producer for requests and a group-less reader of every answer partition."""

    def __init__(self, settings: Settings, *, client_id: str = "frugalstream-client") -> None:
        self.settings = settings
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, on_answer: OnAnswer | None) -> None:
        """Starts the producer, and the answer reader when `on_answer` is given (fire-and-forget needs none)."""
        s = self.settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap, client_id=self._client_id,
            max_request_size=max(s.max_message_bytes * 2, 1_048_576), **aiokafka_security(s),
            **producer_options(idempotent=s.kafka_idempotent),
        )
        await self._producer.start()
        if on_answer is not None:
            await self.start_reader(on_answer)

    async def start_reader(self, on_answer: OnAnswer) -> None:
        if self._reader is not None:
            return
        s = self.settings
        topic = s.topic(t.RESPONSES)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, client_id=f"{self._client_id}-answers", group_id=None,
            enable_auto_commit=False, fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
            max_partition_fetch_bytes=max(s.max_message_bytes * 2, 1_048_576), **aiokafka_security(s),
            **client_options(),
        )
        await consumer.start()
        try:
            await consumer.topics()  # fetches the cluster's metadata
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions:
                raise RuntimeError(f"topic {topic} does not exist on {s.kafka_bootstrap} "
                                   "(run `frugalstream topics` first)")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the positions now: a lazy reset could land after our first answer
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._reader = asyncio.create_task(self._read(consumer, on_answer), name="frugalstream-answers")
        log.info("answer_reader_started", topic=topic, partitions=len(tps))

    async def _read(self, consumer: AIOKafkaConsumer, on_answer: OnAnswer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=1000, max_records=500)
            records = [rec for recs in batch.values() for rec in recs]
            if not records:
                continue
            size = sum(len(rec.value or b"") for rec in records)
            answers = await asyncio.to_thread(_decode, records) if size > INLINE_DECODE_BYTES else _decode(records)
            for response, nbytes in answers:
                on_answer(response, nbytes)

    @property
    def reading(self) -> bool:
        return self._reader is not None and not self._reader.done()

    def reader_failure(self) -> BaseException | None:
        if self._reader is None or not self._reader.done() or self._reader.cancelled():
            return None
        return self._reader.exception()

    async def send(self, request: LLMRequest) -> None:
        """Produces the request keyed by its id and waits for the broker's acknowledgement."""
        if self._producer is None:
            raise RuntimeError("the client is not started")
        data = request.model_dump_json().encode()
        await self._producer.send_and_wait(self.settings.topic(t.REQUESTS), data, key=request.id.encode())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
