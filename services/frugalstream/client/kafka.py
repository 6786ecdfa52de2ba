"""The Kafka side of the client: produce requests to `llm.requests`, read every answer on `llm.responses`
(or, for a client with a reply topic, on that topic: the only answers a tenant's own principal may read).

The answer reader joins no consumer group: it is assigned every partition of the answer topic and starts at
its end, so any number of clients and HTTP entries read side by side without rebalancing each other, and
none commits offsets another depends on. `start` returns only once every partition's position is fixed,
so a request produced after it can never have its answer land before the reader's starting point.

The reader can die (a fetch error: the topic's authorization revoked, a corrupt batch). Then no answer can
arrive, so it says so at once: `on_reader_failure` is called with the error (the client fails every waiting
caller with it, instead of letting each wait its whole timeout), `reader_failure()` keeps it, and the next
`start_reader` starts a new reader.
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
OnFailure = Callable[[BaseException], object]


class AnswerReaderFailed(ConnectionError):
    """The answer reader stopped on an error (its `__cause__`): no answer can arrive until a new one runs."""

    @classmethod
    def of(cls, cause: BaseException) -> AnswerReaderFailed:
        error = cls(f"the answer reader stopped: {type(cause).__name__}: {cause}"[:1000])
        error.__cause__ = cause
        return error


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

    def __init__(self, settings: Settings, *, client_id: str = "frugalstream-client",
                 answers_topic: str | None = None) -> None:
        self.settings = settings
        #: Where answers are read: `llm.responses`, or a reply topic (under `topic_prefix`, as the services write).
        self.answers_topic = settings.topic(answers_topic or t.RESPONSES)
        self._client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        #: Counts stops: a reader whose start spans a stop finds it changed and closes itself instead of running.
        self._stops = 0
        #: Called (on the event loop) with the error that killed the answer reader; the client sets it.
        self.on_reader_failure: OnFailure | None = None

    async def start(self, on_answer: OnAnswer | None) -> None:
        """Starts the producer, and the answer reader when `on_answer` is given (fire-and-forget needs none).
        A second start keeps the running producer: replacing it would leave the first one's connections open."""
        if self._producer is None:
            s = self.settings
            producer = AIOKafkaProducer(
                bootstrap_servers=s.kafka_bootstrap, client_id=self._client_id,
                max_request_size=max(s.max_message_bytes * 2, 1_048_576), **aiokafka_security(s),
                **producer_options(idempotent=s.kafka_idempotent),
            )
            self._producer = producer
            try:
                await producer.start()
            except BaseException:
                self._producer = None
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
        if on_answer is not None:
            await self.start_reader(on_answer)

    async def start_reader(self, on_answer: OnAnswer) -> None:
        """Starts the answer reader unless one runs; a reader that died is replaced (its error raises from
        here if the new one cannot start either)."""
        if self._reader is not None:
            if not self._reader.done():
                return
            await self._stop_reader()
        s = self.settings
        topic = self.answers_topic
        stops = self._stops
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
                hint = ("run `frugalstream topics` first" if topic == s.topic(t.RESPONSES)
                        else "create it: frugalstream copies answers to a reply topic, it does not create one")
                raise RuntimeError(f"topic {topic} does not exist on {s.kafka_bootstrap} ({hint})")
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the positions now: a lazy reset could land after our first answer
                await consumer.position(tp)
            if self._stops != stops:  # stopped meanwhile: a reader kept now would poll for ever, unstopped
                raise ConnectionError("the client stopped while its answer reader started")
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._reader = asyncio.create_task(self._read(consumer, on_answer), name="frugalstream-answers")
        log.info("answer_reader_started", topic=topic, partitions=len(tps))

    async def _read(self, consumer: AIOKafkaConsumer, on_answer: OnAnswer) -> None:
        """Hands every answer to `on_answer` until cancelled; an error ends it and is reported, not kept silent
        in the task: callers waiting for answers must learn at once that none can come."""
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=1000, max_records=500)
                records = [rec for recs in batch.values() for rec in recs]
                if not records:
                    continue
                size = sum(len(rec.value or b"") for rec in records)
                decoded = await asyncio.to_thread(_decode, records) if size > INLINE_DECODE_BYTES else _decode(records)
                for response, nbytes in decoded:
                    on_answer(response, nbytes)
        except Exception as exc:
            self._failure = exc
            log.error("answer_reader_failed", error_type=type(exc).__name__, error=str(exc)[:500])
            if self.on_reader_failure is not None:
                self.on_reader_failure(exc)

    @property
    def reading(self) -> bool:
        return self._reader is not None and not self._reader.done()

    def reader_failure(self) -> BaseException | None:
        """The error that stopped the answer reader, until a new reader starts (None while it runs)."""
        return self._failure

    async def send(self, request: LLMRequest) -> None:
        """Produces the request keyed by its id and waits for the broker's acknowledgement."""
        if self._producer is None:
            raise RuntimeError("the client is not started")
        data = request.model_dump_json().encode()
        await self._producer.send_and_wait(self.settings.topic(t.REQUESTS), data, key=request.id.encode())

    async def stop(self) -> None:
        self._stops += 1
        await self._stop_reader()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _stop_reader(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        self._failure = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                await consumer.stop()
            except Exception as exc:  # a reader that died may not close cleanly; a new one is started regardless
                log.warning("answer_reader_stop_failed", error_type=type(exc).__name__)
