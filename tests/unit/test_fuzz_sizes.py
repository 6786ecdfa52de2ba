"""Hypothesis fuzzing of sizes around and above `max_message_bytes`, through the real stage wiring.

Bodies are valid requests, requests with an id and tenant but one broken field, or raw bytes, sized from
just under the limit to several times it. Whatever arrives: every message the services publish (dead
letters included) fits the limit, every dead letter says the original's size and hash, and every request
that can be identified gets exactly one terminal message (an answer, `too_large` or `invalid_request`).
The in-memory broker does not enforce sizes, so the check is made on the bytes handed to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faststream.kafka import TestKafkaBroker
from hypothesis import HealthCheck, example, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from frugalstream.bootstrap import Resources
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import DeadLetter, LLMRequest, LLMResponse
from frugalstream.schemas import topics as t

LIMIT = 16_384
SHELL = {"id": "", "tenant": "acme", "messages": [{"role": "user", "content": ""}]}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Overrides the unit conftest's settings: a small limit keeps examples fast and the sizes meaningful."""
    return Settings(state_dir=tmp_path / "state", simulated_latency_scale=0.0, kafka_idempotent=False,
                    max_message_bytes=LIMIT)


Published = list[tuple[str, bytes | None]]


@pytest.fixture
async def small_pipeline(resources: Resources) -> AsyncIterator[tuple[RunningServices, Published]]:
    running = RunningServices(["classifier", "dedupe", "gateway", "accountant"], resources)
    seen: Published = []
    publish = running.broker.publish

    async def recording(message: Any = None, topic: str = "", *args: Any, **kwargs: Any) -> Any:
        seen.append((topic, message if isinstance(message, bytes | None) else json.dumps(message).encode()))
        return await publish(message, topic, *args, **kwargs)

    running.broker.publish = recording  # type: ignore[method-assign]
    for svc in running.services:
        await svc.start()
        svc.register(running.broker, running.publisher)
    async with TestKafkaBroker(running.broker):
        yield running, seen
    for svc in reversed(running.services):
        await svc.stop()


def body(rid: str, size: int, how: str) -> bytes:
    """A JSON body of exactly `size` bytes (when size allows): a valid request, or one with a broken field."""
    shell: dict[str, Any] = json.loads(json.dumps(SHELL))
    shell["id"] = rid
    if how == "broken":
        shell["max_tokens"] = -1
    base = len(json.dumps(shell).encode())
    shell["messages"][0]["content"] = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:max(size - base, 1)]
    return json.dumps(shell).encode()


SIZES = st.one_of(st.integers(LIMIT - 2_000, LIMIT + 2_000), st.integers(LIMIT // 2, LIMIT * 4),
                  st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, LIMIT // 2 + 100]))


def decodable(payload: bytes) -> LLMRequest | None:
    if len(payload) > LIMIT:
        return None
    try:
        return LLMRequest.model_validate_json(payload)
    except (ValidationError, ValueError):
        return None


@fuzz_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=SIZES, how=st.sampled_from(["valid", "broken", "raw"]))
@example(size=LIMIT - 400, how="valid")  # decodable, but its routed copy (request + lookup text) is ~2x the limit
@example(size=LIMIT * 4, how="raw")
async def test_sizes_around_the_limit_never_publish_oversize_and_each_request_gets_one_terminal_message(
    small_pipeline: tuple[RunningServices, Published], size: int, how: str,
) -> None:
    running, seen = small_pipeline
    seen.clear()
    rid = f"fz-{uuid.uuid4().hex[:12]}"
    payload = (bytes(range(256)) * (size // 256 + 1))[:size] if how == "raw" else body(rid, size, how)
    await running.broker.publish(payload, t.REQUESTS, key=b"k")

    oversize = [(topic, len(v)) for topic, v in seen if topic != t.REQUESTS and v is not None and len(v) > LIMIT]
    assert not oversize, f"published over the {LIMIT}-byte limit: {oversize}"
    letters = [DeadLetter.model_validate_json(v) for topic, v in seen if topic.endswith(".dlq") and v is not None]
    for letter in letters:
        assert letter.value_size == len(payload) and letter.value_sha256 == hashlib.sha256(payload).hexdigest()
        kept = base64.b64decode(letter.value_b64)
        assert kept == payload if not letter.truncated else payload.startswith(kept) and len(kept) < len(payload)
    terminal = [LLMResponse.model_validate_json(v) for topic, v in seen if topic == t.RESPONSES and v is not None]
    mine = {r.model_dump_json() for r in terminal if r.request_id == rid and r.tenant == "acme"}
    request = decodable(payload)
    if request is not None:
        assert len(mine) == 1, f"a decodable request of {len(payload)} bytes got {len(mine)} terminal messages"
        answer = LLMResponse.model_validate_json(next(iter(mine)))
        assert answer.ok or (answer.error is not None and answer.error.code == "too_large"), answer.error
        assert not letters
    else:
        assert len(letters) == 1, f"an undecodable value of {len(payload)} bytes got {len(letters)} dead letters"
        assert len(mine) <= 1
        if how == "broken" and len(payload) <= LIMIT:
            assert len(mine) == 1, "an invalid request that names its id and tenant gets a terminal error"
        for raw in mine:
            error = LLMResponse.model_validate_json(raw).error
            assert error is not None and error.code in {"invalid_request", "too_large"}
