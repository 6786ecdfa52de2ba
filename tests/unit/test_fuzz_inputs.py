"""Hypothesis fuzzing of every input topic on the in-memory pipeline.

Each fuzzed message is either a valid contract (processed normally) or lands on its topic's DLQ with the
original bytes and a reason; no handler raises, and a valid request published right after is still
answered, so a bad message neither crashes a consumer nor stalls the flow.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from frugalstream.runner import RunningServices
from frugalstream.runtime.records import Out
from frugalstream.schemas import ChatMessage, DeadLetter, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t

INPUT_TOPICS = (t.REQUESTS, t.ROUTED, t.DISPATCH, t.RESPONSES, t.USAGE, t.SUMMARIZE_JOBS, t.BUDGETS)
VALID = LLMRequest(id="seed", tenant="acme", messages=(ChatMessage(role="user", content="hello?"),))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=12)
FIELDS = tuple(VALID.model_dump(mode="json"))


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid request with one field broken: wrong type, missing, huge, or a schema version from the future."""
    body: dict[str, Any] = VALID.model_dump(mode="json")
    field = draw(st.sampled_from(FIELDS))
    how = draw(st.sampled_from(["wrong_type", "missing", "huge", "version"]))
    if how == "wrong_type":
        body[field] = draw(JSON)
    elif how == "missing":
        body.pop(field, None)
    elif how == "huge":
        body[field] = "x" * draw(st.integers(10_000, 300_000))
    else:
        body["schema_version"] = draw(st.integers(2, 10**6))
    return json.dumps(body).encode()


PAYLOADS = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    mutated_request(),
    st.binary(min_size=1, max_size=50).map(lambda b: b'{"id": "' + b + b'"}'),
)


def spy(pipeline: RunningServices) -> tuple[list[Out], list[tuple[Out, bytes]]]:
    """What the stages hand to the publisher, and what actually reaches the broker, as bytes."""
    seen: list[Out] = []
    sent: list[tuple[Out, bytes]] = []
    publish = pipeline.publisher.publish_all
    send = pipeline.publisher._send

    async def recording(outs: Sequence[Out], **kwargs: Any) -> None:
        seen.extend(outs)
        await publish(outs, **kwargs)

    async def sending(out: Out, data: bytes | None) -> None:
        sent.append((out, data or b""))
        await send(out, data)

    pipeline.publisher.publish_all = recording  # type: ignore[method-assign]
    pipeline.publisher._send = sending  # type: ignore[method-assign]
    return seen, sent


def is_valid(model: type[BaseModel], payload: bytes) -> bool:
    try:
        model.model_validate_json(payload)
    except (ValidationError, ValueError):
        return False
    return True


#: Topics more than one service reads (each reader dead-letters what it cannot read, naming itself).
READERS = {t.BUDGETS: ["classifier.budgets", "summarizer.budgets"]}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=st.sampled_from(INPUT_TOPICS), payload=PAYLOADS)
@example(topic=t.REQUESTS, payload=b"\xff\xfe\x00invalid utf-8")
@example(topic=t.REQUESTS, payload=json.dumps(VALID.model_dump(mode="json") | {
    "messages": [{"role": "user", "content": "long " * 250_000}]}).encode())  # over max_message_bytes
@example(topic=t.REQUESTS, payload=json.dumps(VALID.model_dump(mode="json") | {
    "messages": [{"role": "user", "content": "x" * 5_000_000}]}).encode())  # 5 MB: its dead letter is capped
@example(topic=t.ROUTED, payload=b"y" * 1_000_001)  # one byte over the limit
@example(topic=t.REQUESTS, payload=b"z" * 1_000_000)  # exactly at the limit, invalid JSON
async def test_fuzzed_message_is_dead_lettered_or_processed_and_flow_continues(
    pipeline: RunningServices, topic: str, payload: bytes,
) -> None:
    seen, sent = spy(pipeline)
    await pipeline.broker.start()
    await pipeline.broker.publish(payload, topic, key=b"k")  # a handler that raised would raise here
    letters = [DeadLetter.model_validate_json(data) for o, data in sent if isinstance(o.value, DeadLetter)]
    if not is_valid(t.TOPIC_CONTRACTS[topic], payload) or len(payload) > pipeline.settings.max_message_bytes:
        # Exactly one letter from each service that reads the topic (two follow `llm.budgets`).
        services = sorted(letter.service for letter in letters)
        assert services == READERS[topic] if topic in READERS else len(services) == 1, "one letter per reader"
        for letter in letters:
            copied = base64.b64decode(letter.value_b64)
            assert letter.value_size == len(payload) and letter.value_sha256 == hashlib.sha256(payload).hexdigest()
            assert copied == payload if not letter.truncated else payload.startswith(copied) and copied, "raw bytes"
            assert letter.error and letter.topic == topic and letter.key_b64 == base64.b64encode(b"k").decode()
            assert "input_value" not in letter.error, "the reason names fields, never echoes the input"
    # A fresh id each time: a replayed example must not reuse an id the pipeline has already answered.
    probe = VALID.model_copy(update={"id": f"probe-{uuid.uuid4().hex}"})
    await pipeline.broker.publish(probe.model_dump_json().encode(), t.REQUESTS, key=b"k")
    answers = [o.value for o in seen if isinstance(o.value, LLMResponse) and o.value.request_id == probe.id]
    assert answers and answers[0].ok, "the next valid request on the same key is still answered"
    limit = pipeline.settings.max_message_bytes
    assert all(len(data) <= limit for _, data in sent), "nothing over the limit reaches the broker"
