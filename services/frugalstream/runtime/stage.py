"""The consume-process-publish loop every service shares.

Per batch, in order:
1. decode each record against its contract; failures are dead-lettered, never raised, and the handler's
   `on_invalid` hook turns each into outputs (a terminal error for a request that can be identified);
2. process the valid ones (plain logic, no Kafka); a batch that raises is retried message by message, and
   a message that still raises is dead-lettered with its error (and, when it is a request, answered with a
   terminal error), so one poison message cannot stall a partition;
3. publish every output and dead letter, waiting for the broker's acknowledgements (sizes are checked
   first, see `Publisher`; reply-topic copies and dead letters are best effort). A step may publish a record's
   outputs before its batch ends (`BatchContext.release`: the gateway's fast answer does not wait for a
   batch-mate's long one); they are published again if the batch is redelivered, like any output;
4. run the step's `after_publish` hooks (what must follow the acknowledged outputs: a state-topic tombstone,
   memory that says "answered"); a hook that fails fails the batch like a failed publish;
5. return, and FastStream commits the offsets (`AckPolicy.NACK_ON_ERROR`). If publishing fails, the
   partitions are paused for a backoff (0.5 s doubling to 30 s) and the handler raises: they rewind to the
   batch start and the batch is redelivered after the pause. Outputs may repeat, but nothing is lost, and a
   broker outage does not turn into a busy loop.

A process step is called with the batch and a `BatchContext` (what the consumer can do) and returns its
outputs, or a `Handled` that also names records to deliver again later (`Handled.deferred`: a provider's
Retry-After, state not loaded yet). Each deferred record's partition is rewound to it, paused, and resumed
after the wait; the commit that follows stores the rewound position, so the record is neither lost nor
blocking the other partitions, and no handler sleeps. Records after it on that partition come again too: the
step holds back their outputs (they replay, once, on redelivery). Deferring needs a consumer that can pause
(`BatchContext.can_defer`); on one that cannot (FastStream's in-memory test broker), a step answers instead.

Observability rides along: with tracing on, each record gets a span continuing the trace in its headers and
each output carries its record's trace context (`runtime.tracing`); after a batch the partitions' lag is
recorded; every group member is tracked for readiness (`runtime.probes`).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import TopicPartition
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import BaseModel

from frugalstream.runtime import tracing
from frugalstream.runtime.batch_poll import prompt_polling
from frugalstream.runtime.broker import batch_subscriber_options
from frugalstream.runtime.inflight import InFlight
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher, decode
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.records import Decoded, Failure, Out, Record, records_of
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import OwnedPartitions, StateFollower
from frugalstream.schemas import LLMRequest, RoutedRequest
from frugalstream.schemas.responses import error_response

M = TypeVar("M", bound=BaseModel)
log = get_logger(__name__)


#: Publishes outputs now, ahead of the batch's; False when the broker did not take them (the step then keeps them
#: for the batch's own publish, which fails the batch if the broker still refuses).
Release = Callable[[Sequence[Out]], Awaitable[bool]]


@dataclass(frozen=True)
class BatchContext:
    """What the consumer handling this batch can do, handed to every process step (no hidden state)."""

    can_defer: bool = False
    release: Release | None = None


@dataclass(frozen=True)
class Deferral:
    """Deliver `record` (and the rest of its partition) again after `after_s`, instead of answering it now."""

    record: Record
    after_s: float


#: Run once a batch's outputs are acknowledged, before its offsets are committed.
AfterPublish = Callable[[], Awaitable[None]]


@dataclass
class Handled:
    """A process step's result: outputs to publish, records to deliver again later, and hooks to run once the
    outputs are acknowledged (in order, before the commit). A step that changes its memory only in a hook
    decides the same again when a failed publish redelivers the batch."""

    outs: list[Out] = field(default_factory=list)
    deferred: list[Deferral] = field(default_factory=list)
    after_publish: list[AfterPublish] = field(default_factory=list)

    def extend(self, other: Handled | list[Out]) -> None:
        if isinstance(other, Handled):
            self.outs.extend(other.outs)
            self.deferred.extend(other.deferred)
            self.after_publish.extend(other.after_publish)
        else:
            self.outs.extend(other)


Process = Callable[[Sequence[Decoded[M]], BatchContext], Awaitable["Handled | list[Out]"]]


def rewind_points(deferred: Sequence[Deferral]) -> dict[tuple[str, int], tuple[int, float]]:
    """Per partition: the earliest deferred offset (it is delivered again from there) and the longest wait."""
    points: dict[tuple[str, int], tuple[int, float]] = {}
    for d in deferred:
        key = (d.record.topic, d.record.partition)
        offset, wait = points.get(key, (d.record.offset, 0.0))
        points[key] = (min(offset, d.record.offset), max(wait, d.after_s))
    return points


def _apply_deferrals(consumer: Any, deferred: Sequence[Deferral]) -> None:
    """Rewind and pause each deferred partition; FastStream's commit then stores the rewound position."""
    if not hasattr(consumer, "pause"):
        raise RuntimeError("a step deferred records on a consumer that cannot pause (BatchContext.can_defer)")
    loop = asyncio.get_running_loop()
    for (topic, partition), (offset, wait) in rewind_points(deferred).items():
        tp = TopicPartition(topic, partition)
        consumer.seek(tp, offset)
        consumer.pause(tp)
        loop.call_later(wait, _resume, consumer, tp)
        log.info("partition_paused", topic=topic, partition=partition, offset=offset, seconds=round(wait, 2))


def _resume(consumer: Any, tp: TopicPartition) -> None:
    # After a rebalance the partition may belong to another member (and is no longer paused here).
    if tp in consumer.assignment():
        consumer.resume(tp)


async def run_batch(process: Process[M], good: Sequence[Decoded[M]], bad: list[Failure],
                    ctx: BatchContext = BatchContext()) -> Handled:
    done = Handled()
    try:
        done.extend(await process(good, ctx))
        return done
    except Exception:
        log.exception("batch_failed_retrying_individually", size=len(good))
    for item in good:
        try:
            done.extend(await process([item], ctx))
        except Exception as exc:
            rec = item.record
            log.exception("record_failed", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                          error_type=type(exc).__name__)
            bad.append((rec, exc))
            done.outs.extend(_poison_answer(item.value, exc))
    return done


def _poison_answer(value: BaseModel, exc: Exception) -> list[Out]:
    """A request whose processing keeps failing still gets its one terminal message (it is dead-lettered too).

    Its own outputs were discarded with the exception, so this is the only terminal message for it.
    """
    if isinstance(value, RoutedRequest):
        request, routed, key = value.request, value, value.keys.scope
    elif isinstance(value, LLMRequest):
        request, routed, key = value, None, None
    else:
        return []
    message = f"processing failed ({type(exc).__name__}); the request was dead-lettered"
    return response_outs(error_response(request, "delivery_failed", message, routed=routed), request, key)


class _Backoff:
    """Consecutive failed publishes of one subscriber: 0.5 s, 1 s, 2 s ... up to 30 s; a success resets it."""

    def __init__(self, first_s: float = 0.5, cap_s: float = 30.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        delay: float = min(self.first_s * 2.0 ** min(self.failures, 16), self.cap_s)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


def _pause_for(consumer: Any, records: Sequence[Record], seconds: float) -> bool:
    """Pauses every partition of the batch for `seconds`; the NACK that follows rewinds them to its start."""
    if not hasattr(consumer, "pause"):
        return False
    loop = asyncio.get_running_loop()
    for topic, partition in sorted({(r.topic, r.partition) for r in records}):
        tp = TopicPartition(topic, partition)
        consumer.pause(tp)
        loop.call_later(seconds, _resume, consumer, tp)
    return True


def _invalid_outputs(spec: TopicHandler[Any], bad: Sequence[Failure]) -> list[Out]:
    """The handler's answers for records that failed to decode; a hook that raises is logged, never fatal."""
    if spec.on_invalid is None:
        return []
    outs: list[Out] = []
    for rec, exc in bad:
        try:
            outs.extend(spec.on_invalid(rec, exc))
        except Exception:
            log.exception("on_invalid_failed", topic=rec.topic, partition=rec.partition, offset=rec.offset)
    return outs


class _CrashAfterPublish:
    """Fault injection for the crash tests: exit hard once the N-th batch is published but not yet committed.

    `os._exit` skips every `finally`, flush and commit, exactly like SIGKILL in the worst possible place.
    """

    def __init__(self, after_batches: int) -> None:
        self._left = after_batches

    def after_publish(self) -> None:
        self._left -= 1
        if self._left <= 0:
            log.warning("fault_injected_exit", where="after_publish_before_commit")
            os._exit(FAULT_EXIT_CODE)


#: Exit status of an injected crash, so a test can tell it from a real failure.
FAULT_EXIT_CODE = 86


#: How long a consumer off the answer path waits for data. On a broker that answers a waiting fetch only when
#: it times out (the embedded one) each consumer polls at this period: twelve consumers at 50 ms kept a third
#: of a core busy in an idle `frugalstream dev`; a budget or a cost event half a second later changes nothing.
BACKGROUND_WAIT_MS = 500


def background_options() -> dict[str, Any]:
    """For consumers no caller waits on (cost accounting, budgets, state topics, backfills): poll slowly."""
    return {"fetch_max_wait_ms": BACKGROUND_WAIT_MS, "batch_timeout_ms": BACKGROUND_WAIT_MS}


def whole_topic_options() -> dict[str, Any]:
    """For compacted state topics every instance reads in full: no group, so no commits, from the start."""
    return {"group_id": None, "ack_policy": AckPolicy.ACK_FIRST, **background_options()}


#: Turns a record that failed to decode into outputs (a terminal error for a request that can be identified).
OnInvalid = Callable[[Record, Exception], list[Out]]


@dataclass(frozen=True)
class TopicHandler(Generic[M]):
    topic: str
    model: type[M]
    process: Process[M]
    on_invalid: OnInvalid | None = None


def partition_runs(records: Sequence[Record]) -> list[list[Record]]:
    """A polled batch as one batch per partition, each in offset order.

    Run in flight apart, one partition's answers never wait for another's slow work (a strong model's long
    answer, a long history to embed), while a request and a redelivered copy of it, which share a partition,
    stay in one batch, where the step handles them once."""
    runs: dict[tuple[str, int], list[Record]] = {}
    for record in records:
        runs.setdefault((record.topic, record.partition), []).append(record)
    return list(runs.values())


def subscribe(
    broker: KafkaBroker, publisher: Publisher, settings: Settings, *, service: str, topic: str,
    model: type[M], process: Process[M], max_records: int = 64, on_invalid: OnInvalid | None = None,
    **options: Any,
) -> None:
    """Registers a batch subscriber for `topic` (logical name) that runs the steps in the module docstring."""
    subscribe_many(broker, publisher, settings, service=service,
                   handlers=[TopicHandler(topic, model, process, on_invalid)], max_records=max_records, **options)


def follow_state(
    broker: KafkaBroker, publisher: Publisher, settings: Settings, *, service: str, topic: str,
    model: type[M], update: Callable[[M], None],
) -> None:
    """Reads a compacted control topic whole (budgets, thresholds) into the service's in-memory view: every
    instance needs every record, so no group (`whole_topic_options`); each value is handed to `update`. The
    topic is read to its end before consuming starts (`Publisher.preload_state`), and once more from its start
    by this consumer, which skips what that read applied (`StateFollower`)."""
    follower = StateFollower(topic, model, update)
    publisher.followers.append(follower)

    async def process(batch: Sequence[Decoded[M]], _ctx: BatchContext) -> list[Out]:
        for decoded in batch:
            follower.apply(decoded.value, decoded.record.partition, decoded.record.offset)
        return []

    subscribe(broker, publisher, settings, service=service, topic=topic, model=model, process=process,
              **whole_topic_options())


def subscribe_many(
    broker: KafkaBroker, publisher: Publisher, settings: Settings, *, service: str,
    handlers: Sequence[TopicHandler[Any]], max_records: int = 64, concurrency: int = 1,
    concurrency_per_record: bool = False, **options: Any,
) -> None:
    """One consumer over several topics; each batch is split by topic and handled in the given order.

    Co-partitioned topics (same key, same partition count) need one consumer with a range assignor, so the
    instance that owns partition N of one topic owns partition N of the others. `concurrency` > 1 runs that many
    batches at once (records, with `concurrency_per_record`), committed in offset order (`runtime.inflight`), for
    stages whose records are independent; each polled batch is split by partition first (`partition_runs`), and a
    deferral waits inside its batch's task instead of pausing the partition.
    """
    by_topic = {settings.topic(h.topic): h for h in handlers}
    fault = _CrashAfterPublish(settings.fault_exit_after_batches) if settings.fault_exit_after_publish == service \
        else None
    backoff = _Backoff()
    kwargs = {**batch_subscriber_options(settings, service, max_records=max_records), **options}
    group: str | None = kwargs.get("group_id")
    if group is not None:
        # Readiness waits for every group member's first assignment and the state of what it owns.
        kwargs.setdefault("listener", OwnedPartitions(settings, handlers[0].topic))
        publisher.health.track(service, kwargs["listener"])

    inflight = InFlight(service, concurrency, per_record=concurrency_per_record) \
        if concurrency > 1 and group is not None else None
    if inflight is not None:
        kwargs["ack_policy"] = AckPolicy.MANUAL  # InFlight commits, in offset order
        publisher.inflight.append(inflight)
        listener = kwargs.get("listener")
        if isinstance(listener, OwnedPartitions) and listener.inflight is None:
            listener.inflight = inflight  # a revoke waits for the revoked partitions' batches (OwnedPartitions)

    async def handler(msg: KafkaMessage) -> None:
        records = records_of(msg)
        consumer = getattr(msg, "consumer", None)
        if inflight is not None and all(hasattr(consumer, a) for a in ("commit", "assignment", "pause")):
            # (FastStream's in-memory test broker hands a fake consumer without them: batches run inline there)
            for run in partition_runs(records):
                await inflight.submit(run, consumer, functools.partial(run_in_flight, run, consumer, inflight))
            return
        with tracing.batch_trace(service, group) as trace:
            await handle(records, consumer, trace)

    async def run_in_flight(records: list[Record], consumer: Any, flight: InFlight) -> None:
        """The batch, then again the records a step deferred (and those after them on their partition, whose
        outputs the step held back), after the wait it asked for, unless their partition is revoked meanwhile."""
        while records:
            with tracing.batch_trace(service, group) as trace:
                deferred = await handle(records, consumer, trace, defer_inline=True)
            if not deferred:
                return
            points = rewind_points(deferred)
            records = [r for r in records if r.offset >= points.get((r.topic, r.partition), (r.offset + 1, 0))[0]]
            # Ended by a revoke of the partition (BatchRevokedError): its owner then has these records, and this
            # batch stops, uncommitted, instead of handling (and paying for) them again after the revoke's bound.
            await flight.sleep(max(wait for _, wait in points.values()))

    async def handle(records: list[Record], consumer: Any, trace: tracing.BatchTrace, *,
                     defer_inline: bool = False) -> list[Deferral]:
        started = time.perf_counter()
        ctx = BatchContext(can_defer=hasattr(consumer, "pause"), release=_releaser(publisher, trace, service))
        done = Handled()
        bad_all: list[Failure] = []
        for name, spec in by_topic.items():
            mine = [r for r in records if r.topic == name]
            if not mine:
                continue
            good, bad = decode(mine, spec.model, max_bytes=settings.max_message_bytes)  # 0.2 ms per MB: inline
            trace.add(good, bad)
            done.outs.extend(_invalid_outputs(spec, bad))
            if good:
                poisoned = len(bad)
                done.extend(await run_batch(spec.process, good, bad, ctx))
                trace.failed(bad[poisoned:])
            bad_all.extend(bad)
        outs = done.outs
        processed = time.perf_counter()
        if records:
            publisher.metrics.observe_latency(service, (processed - started) / len(records))
        try:
            letters = await publisher.capped_letters(bad_all, service)
            await publisher.publish_all(trace.stamp([*outs, *letters]), service=service)
            for hook in done.after_publish:
                await hook()
        except Exception:
            delay = backoff.next_delay()
            paused = _pause_for(consumer, records, delay)
            publisher.metrics.record_publish_backoff(service)
            log.exception("publish_failed_backing_off", service=service, records=len(records),
                          seconds=delay if paused else 0.0)
            raise  # NACK: the offsets are not committed and the batch is redelivered after the pause
        backoff.reset()
        if done.deferred and not defer_inline:
            _apply_deferrals(consumer, done.deferred)
        if fault is not None and records:
            fault.after_publish()
        if group is not None:
            _observe_lag(publisher.metrics, group, consumer, records)
        published = time.perf_counter()
        publisher.metrics.observe_stage(service, len(records), processed - started, published - processed)
        log.debug("batch_done", service=service, records=len(records), outputs=len(outs),
                  process_ms=round((processed - started) * 1000, 1),
                  publish_ms=round((published - processed) * 1000, 1))
        return done.deferred

    handler.__name__ = f"{service.replace('.', '_')}_handler"
    prompt_polling(broker.subscriber(*by_topic, **kwargs))(handler)


def _releaser(publisher: Publisher, trace: tracing.BatchTrace, service: str) -> Release:
    async def release(outs: Sequence[Out]) -> bool:
        try:
            await publisher.publish_all(trace.stamp(outs), service=service)
        except Exception:
            log.warning("release_failed_kept_for_batch", service=service, outputs=len(outs), exc_info=True)
            return False
        return True

    return release


def _observe_lag(metrics: Metrics, group: str, consumer: Any, records: Sequence[Record]) -> None:
    """Lag of the batch's partitions from the high watermark the last fetch reported (no broker round trip)."""
    if consumer is None or not hasattr(consumer, "highwater"):
        return  # the in-memory test broker has no offsets
    nxt: dict[tuple[str, int], int] = {}
    for r in records:
        nxt[(r.topic, r.partition)] = max(nxt.get((r.topic, r.partition), 0), r.offset + 1)
    lags = {}
    for (topic, partition), offset in nxt.items():
        high = consumer.highwater(TopicPartition(topic, partition))
        if high is not None:
            lags[(topic, partition)] = high - offset
    metrics.record_lag(group, lags, {(tp.topic, tp.partition) for tp in consumer.assignment()})
