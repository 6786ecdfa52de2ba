"""Decoding, dead-lettering and publishing: the only place that touches raw Kafka records."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from faststream.kafka import KafkaBroker
from pydantic import BaseModel, ValidationError

from frugalstream.runtime.inflight import InFlight
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.probes import Health
from frugalstream.runtime.records import Decoded, Failure, Out, Record
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.state_topics import StateFollower, read_to_end
from frugalstream.schemas import BudgetState, DeadLetter, LLMResponse, ResponseError, RoutedRequest, wire_bytes
from frugalstream.schemas import topics as t
from frugalstream.schemas.responses import error_response
from frugalstream.schemas.topics import dlq_topic

M = TypeVar("M", bound=BaseModel)
log = get_logger(__name__)


def decode(records: Sequence[Record], model: type[M], *, max_bytes: int) -> tuple[list[Decoded[M]], list[Failure]]:
    """Splits a batch into valid contracts and failures; nothing raises, so one bad message never stalls a batch.

    Any exception while decoding a record makes it a failure, not only pydantic's `ValidationError`: a
    validator that trips over an input of the wrong JSON type (a `TypeError`, say) must dead-letter its record,
    not raise out of the handler, where the batch would be redelivered (or retried in flight) forever and the
    good records around it never answered.
    """
    good: list[Decoded[M]] = []
    bad: list[tuple[Record, Exception]] = []
    for rec in records:
        try:
            if rec.value is None:
                raise ValueError("empty message (tombstone) on a non-compacted topic")
            if len(rec.value) > max_bytes:
                raise ValueError(f"message of {len(rec.value)} bytes exceeds the {max_bytes}-byte limit")
            good.append(Decoded(rec, model.model_validate_json(rec.value)))
        except Exception as exc:  # any failure is this record's, never the batch's (see above)
            bad.append((rec, exc))
    return good, bad


#: Error text kept in a dead letter (the contract's limit); the text names fields, never input values.
MAX_ERROR_CHARS = 4000
#: A dead letter fills at most this share of `max_message_bytes`: the rest is margin for the record's key,
#: headers and batch overhead, so the letter itself can never be refused by the broker.
DEAD_LETTER_FILL = 0.8
#: Headers and key copied into a dead letter are capped too (a producer can send megabytes of either).
MAX_LETTER_HEADER_BYTES = 8 * 1024
MAX_LETTER_KEY_BYTES = 1024
#: Per publish call, outputs are serialized on the event loop until this many bytes, the rest on a thread:
#: a batch of large prompts must not stall every other consumer in the process.
INLINE_SERIALIZE_BYTES = 256 * 1024
#: A best-effort publish (a reply-topic copy, a dead letter) waits at most this long: a topic that does not
#: exist on a broker with auto-create off would otherwise hold the batch for the producer's metadata timeout.
BEST_EFFORT_TIMEOUT_S = 10.0


def first_errors(exc: ValidationError, limit: int) -> list[dict[str, Any]]:
    """The first `limit` errors (type, loc, msg: never the input). `exc.errors()` makes Python objects of every
    error, holding the GIL: a 900 KB request of 300,000 invalid messages took seconds to describe. pydantic writes
    them all as JSON in milliseconds, and only the first few are read back."""
    text = exc.json(include_url=False, include_input=False, include_context=False)
    decoder = json.JSONDecoder()
    entries: list[dict[str, Any]] = []
    pos = 1  # past the "["; compact JSON, one "," between entries
    while len(entries) < limit and pos < len(text) - 1:
        entry, pos = decoder.raw_decode(text, pos)
        entries.append(entry)
        pos += 1
    return entries


def _error_text(exc: Exception, limit: int = MAX_ERROR_CHARS) -> str:
    if isinstance(exc, ValidationError):
        # Field paths and error types only: the input values may be prompt text. An entry is over 30 characters,
        # so the first limit // 30 + 1 fill the text.
        text = json.dumps([{"loc": e["loc"], "type": e["type"], "msg": e["msg"]}
                           for e in first_errors(exc, limit // 30 + 1)])
    else:
        text = str(exc)
    return text[:limit]


def _capped_headers(headers: Mapping[str, str]) -> dict[str, str]:
    kept: dict[str, str] = {}
    room = MAX_LETTER_HEADER_BYTES
    for name, value in headers.items():
        name, value = name[:256], value[:1024]
        cost = len(name) + len(value)
        if cost > room:
            kept["frugal-dlq-headers-truncated"] = "true"
            break
        room -= cost
        kept[name] = value
    return kept


def capped_letter(*, topic: str, partition: int | None, offset: int | None, key: bytes | None, value: bytes | None,
                  headers: Mapping[str, str], error_type: str, error: str, service: str,
                  max_bytes: int) -> DeadLetter:
    """A dead letter that always serializes under `DEAD_LETTER_FILL * max_bytes`, whatever it describes.

    The value is copied whole when it fits, else its first bytes (`truncated`); `value_size` and `value_sha256`
    always describe the whole original, which stays on its topic at `offset`. Without the cap, a 5 MB record's
    base64 copy is refused by the producer and the stage retries the same offset forever.
    """
    raw = value or b""
    note = ""
    if key is not None and len(key) > MAX_LETTER_KEY_BYTES:
        note = f" (key truncated to {MAX_LETTER_KEY_BYTES} of {len(key)} bytes)"
        key = key[:MAX_LETTER_KEY_BYTES]
    error_room = max(min(MAX_ERROR_CHARS, max_bytes // 8) - len(note), 0)
    letter = DeadLetter(
        topic=topic, partition=partition, offset=offset,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        value_b64="", value_size=len(raw), value_sha256=hashlib.sha256(raw).hexdigest(), truncated=True,
        headers=_capped_headers(headers), error_type=error_type[:200], error=error[:error_room] + note,
        service=service, failed_at=time.time(),
    )
    room = int(max_bytes * DEAD_LETTER_FILL) - wire_bytes(letter)
    keep = max(room, 0) // 4 * 3  # base64 turns 3 bytes into 4 characters
    if len(raw) <= keep:
        return letter.model_copy(update={"value_b64": base64.b64encode(raw).decode(), "truncated": False})
    return letter.model_copy(update={"value_b64": base64.b64encode(raw[:keep]).decode()})


def _letter_key(key: bytes | None) -> str | None:
    return key[:MAX_LETTER_KEY_BYTES].decode("utf-8", "replace") if key else None


def dead_letter(record: Record, exc: Exception, service: str, *, max_bytes: int = 1_000_000) -> Out:
    """The capped dead letter of a consumed record, for `<its full topic name>.dlq`."""
    letter = capped_letter(
        topic=record.topic, partition=record.partition, offset=record.offset, key=record.key, value=record.value,
        headers={k: v.decode("utf-8", "replace") for k, v in record.headers}, error_type=type(exc).__name__,
        error=_error_text(exc), service=service, max_bytes=max_bytes,
    )
    # The DLQ topic name keeps the source topic's full (possibly prefixed) name.
    return Out(topic=dlq_topic(record.topic), value=letter, key=_letter_key(record.key), prefixed=True)


def _encode(out: Out) -> bytes | None:
    return out.value.model_dump_json(exclude_none=False).encode() if out.value is not None else None


def _encode_each(outs: Sequence[Out]) -> list[bytes | None]:
    return [_encode(out) for out in outs]


def _best_effort(out: Out) -> bool:
    return out.side or isinstance(out.value, DeadLetter)


class Publisher:
    """Publishes outputs and waits for the broker's acks, so the caller may commit afterwards.

    Every terminal response, routing decision and budget state passes through here, which makes it the place
    that feeds their Prometheus series (spend and savings are counted by the accountant when the ledger stores
    an event, so a redelivery counts once), and the one place that keeps an output from wedging a partition:

    * each output is serialized once and its size checked against `max_message_bytes` before sending. A
      response, or a routed or dispatched request, that is too large becomes a terminal `too_large` error
      for its request (a ~1 MB prompt doubles once routed: the lookup text copies it); anything else too
      large is dead-lettered, capped;
    * primary outputs must all be acknowledged, else `publish_all` raises and the batch is redelivered;
      best-effort ones (`Out.side` reply-topic copies, dead letters) are bounded in time, and a failure is
      logged and counted, never raised: a producer's typo'd reply topic must not stall its partition.
    """

    def __init__(self, broker: KafkaBroker, settings: Settings, metrics: Metrics = METRICS, *,
                 best_effort_timeout_s: float = BEST_EFFORT_TIMEOUT_S, health: Health | None = None) -> None:
        self._broker = broker
        self._settings = settings
        self.metrics = metrics
        metrics.bound_tenants(settings.tenants, settings.metrics_tenant_labels)
        self.health = health if health is not None else Health()  # the stage registers its consumers here
        self.inflight: list[InFlight] = []  # consumers with batches in flight (`runtime.inflight`), to drain
        self.followers: list[StateFollower[Any]] = []  # control topics to read whole before consuming starts
        self._best_effort_timeout_s = best_effort_timeout_s

    async def preload_state(self) -> None:
        """Before the consumers start: every followed control topic read to its end (`StateFollower`)."""
        started = time.monotonic()
        by_topic: dict[str, list[StateFollower[Any]]] = {}
        for follower in self.followers:  # services in one process follow the same topics: each is read once
            by_topic.setdefault(follower.topic, []).append(follower)
        reads = await asyncio.gather(*(read_to_end(self._settings, name, followers[0].model)
                                       for name, followers in by_topic.items()))
        for followers, (values, last) in zip(by_topic.values(), reads, strict=True):
            for follower in followers:
                follower.catch_up(values, last)
        if by_topic:
            log.info("state_preloaded", topics=sorted(by_topic), records=sum(len(values) for values, _ in reads),
                     seconds=round(time.monotonic() - started, 2))

    async def drain(self, timeout_s: float) -> None:
        """Before the broker stops: the batches in flight publish and commit (or are left to come again)."""
        await asyncio.gather(*(f.drain(timeout_s) for f in self.inflight))

    def topic(self, out: Out) -> str:
        return out.topic if out.prefixed else self._settings.topic(out.topic)

    async def publish_all(self, outs: Sequence[Out], *, service: str = "publisher") -> None:
        if not outs:
            return
        ready = self._fit(list(zip(outs, await self._encode_all(outs), strict=True)), service)
        primary = [(out, data) for out, data in ready if not _best_effort(out)]
        others = [(out, data) for out, data in ready if _best_effort(out)]
        results = await asyncio.gather(*(self._send(out, data) for out, data in primary),
                                       *(self._send_best_effort(out, data) for out, data in others),
                                       return_exceptions=True)
        for result in results[:len(primary)]:
            if isinstance(result, BaseException):
                raise result
        for out, _ in primary:
            self._observe(out, service)

    async def _encode_all(self, outs: Sequence[Out]) -> list[bytes | None]:
        encoded: list[bytes | None] = []
        size = 0
        for out in outs:
            if size >= INLINE_SERIALIZE_BYTES:
                return encoded + await asyncio.to_thread(_encode_each, outs[len(encoded):])
            data = _encode(out)
            encoded.append(data)
            size += len(data or b"")
        return encoded

    def _fit(self, items: list[tuple[Out, bytes | None]], service: str) -> list[tuple[Out, bytes | None]]:
        """Replaces every output over the limit; never sends one as is."""
        limit = self._settings.max_message_bytes
        errors: dict[tuple[str, str], LLMResponse] = {}  # one error per request: never two distinct terminals
        fitted: list[tuple[Out, bytes | None]] = []
        for out, data in items:
            if data is None or len(data) <= limit:
                fitted.append((out, data))
                continue
            value = out.value
            log.warning("output_too_large", topic=out.topic if not out.side else "reply_topic", size=len(data),
                        limit=limit, service=service, request_id=_request_id(value))
            self.metrics.record_oversize(_kind(out))
            for replacement in self._replace(out, data, service, errors):
                fitted.append((replacement, _encode(replacement)))
        return fitted

    def _replace(self, out: Out, data: bytes, service: str,
                 errors: dict[tuple[str, str], LLMResponse]) -> list[Out]:

        value = out.value
        message = f"the answer or request is {len(data)} bytes, over the {self._settings.max_message_bytes}-byte limit"
        if isinstance(value, LLMResponse):
            error = errors.setdefault((value.tenant, value.request_id), _too_large(value, message))
            return [replace(out, value=error)]
        if isinstance(value, RoutedRequest) and not out.prefixed and out.topic in (t.ROUTED, t.DISPATCH):
            request = value.request
            error = errors.setdefault((request.tenant, request.id),
                                      error_response(request, "too_large", message, routed=value))
            return response_outs(error, request, out.key)
        if isinstance(value, DeadLetter):
            return []  # capped by construction; if one still is not, dropping it beats wedging
        full = self.topic(out)
        letter = capped_letter(
            topic=full, partition=out.partition, offset=None,
            key=out.key.encode() if out.key is not None else None, value=data, headers=out.headers,
            error_type="MessageTooLarge", error=f"output of {len(data)} bytes for {full} exceeds max_message_bytes="
                                                f"{self._settings.max_message_bytes}",
            service=service, max_bytes=self._settings.max_message_bytes,
        )
        return [Out(dlq_topic(full), letter, key=_letter_key(out.key.encode() if out.key else None), prefixed=True)]

    def _observe(self, out: Out, service: str) -> None:
        value = out.value
        if out.side:
            return
        if out.topic == t.RESPONSES and isinstance(value, LLMResponse):
            self.metrics.record_response(value.source)
            if value.error is not None:
                self.metrics.record_error(service, value.error.code)
        elif out.topic == t.ROUTED and isinstance(value, RoutedRequest):
            self.metrics.record_route(value.route.tier, value.route.task_type)
        elif out.topic == t.BUDGETS and isinstance(value, BudgetState):
            self.metrics.record_budget(value)

    async def _send(self, out: Out, data: bytes | None) -> None:
        headers = {"content-type": "application/json", **out.headers}
        await self._broker.publish(
            data, self.topic(out), key=out.key.encode() if out.key is not None else None, partition=out.partition,
            headers=headers,
        )

    async def _send_best_effort(self, out: Out, data: bytes | None) -> None:
        try:
            async with asyncio.timeout(self._best_effort_timeout_s):
                await self._send(out, data)
        except Exception as exc:  # a side copy or a dead letter never fails the batch
            if isinstance(out.value, DeadLetter):
                letter = out.value
                log.error("dead_letter_publish_failed", topic=letter.topic, partition=letter.partition,
                          offset=letter.offset, error_type=type(exc).__name__)
                self.metrics.record_best_effort_failure("dead_letter")
            else:
                log.error("reply_publish_failed", topic=self.topic(out), request_id=_request_id(out.value),
                          error_type=type(exc).__name__)
                self.metrics.record_best_effort_failure("reply")

    def letters(self, failures: Sequence[Failure], service: str) -> list[Out]:
        """Logs each failure (coordinates and error type only) and returns its capped dead letter."""
        for rec, exc in failures:
            log.warning("dead_letter", topic=rec.topic, partition=rec.partition, offset=rec.offset,
                        error_type=type(exc).__name__, service=service)
        return [dead_letter(rec, exc, service, max_bytes=self._settings.max_message_bytes) for rec, exc in failures]

    async def capped_letters(self, failures: Sequence[Failure], service: str) -> list[Out]:
        """`letters`, on a worker thread when the values are large (hashing megabytes stalls the loop)."""
        if sum(len(rec.value or b"") for rec, _ in failures) > INLINE_SERIALIZE_BYTES:
            return await asyncio.to_thread(self.letters, failures, service)
        return self.letters(failures, service)


def _request_id(value: BaseModel | None) -> str | None:
    if isinstance(value, LLMResponse):
        return value.request_id
    if isinstance(value, RoutedRequest):
        return value.request.id
    return None


def _kind(out: Out) -> str:
    if out.side:
        return "reply"
    if out.prefixed:
        return "dead_letter" if isinstance(out.value, DeadLetter) else "other"
    return out.topic


def _too_large(response: LLMResponse, message: str) -> LLMResponse:
    return LLMResponse(
        request_id=response.request_id, tenant=response.tenant, source="error",
        error=ResponseError(code="too_large", message=message), model=response.model, tier=response.tier,
        task_type=response.task_type, simulated=response.simulated, created_at=response.created_at,
        responded_at=time.time(),
    )
