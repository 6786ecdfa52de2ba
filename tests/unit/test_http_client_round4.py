"""The HTTP entry and the client against a hostile caller and a slow broker (round 4), without a broker: a fake
transport plays the pipeline.

- a model name the pipeline echoes back (a pin the catalog prices by its last path part, with any bytes
  before it) cannot break or inject the response headers;
- every waiting call counts against the entry's cap, retries of one Idempotency-Key included;
- a send or an answer-reader start that hangs on a slow broker ends at the caller's timeout;
- a 504 or 503 for a call without an Idempotency-Key tells the openai SDK not to retry it: the request is
  still in the pipeline, and a retry without a key is a second, paid, request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from frugalstream.client import AnswerReaderFailed, FrugalClient
from frugalstream.client.kafka import OnAnswer
from frugalstream.http_entry.app import Entry, build_app
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.pricing import Pricer
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMRequest, LLMResponse, TokenUsage

KEYS = {"key-a1": "tenant-a", "key-a2": "tenant-a"}  # one tenant: no per-tenant share caps it
ASK = {"model": "auto", "messages": [{"role": "user", "content": "What are your hours?"}]}
URL = "/v1/chat/completions"


def auth(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    return {**headers, "idempotency-key": idempotency_key} if idempotency_key else headers


class Pipeline:
    """Answers each request with the model it pinned (as the simulated provider does), or holds it; `hang`
    makes sends, `hang_reader` reader starts, never return (a broker that accepts and never answers)."""

    def __init__(self) -> None:
        self.sent: list[LLMRequest] = []
        self.on_answer: OnAnswer | None = None
        self.hold = False
        self.hang = False
        self.hang_reader = False
        self.fail_reader: BaseException | None = None

    async def start(self, on_answer: OnAnswer | None) -> None:
        self.on_answer = on_answer

    async def start_reader(self, on_answer: OnAnswer) -> None:
        if self.hang_reader:
            await asyncio.Event().wait()
        self.on_answer = on_answer

    async def send(self, request: LLMRequest) -> None:
        if self.hang:
            await asyncio.Event().wait()
        self.sent.append(request)
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.answer, request)

    def answer(self, request: LLMRequest) -> None:
        assert self.on_answer is not None
        self.on_answer(LLMResponse(
            request_id=request.id, tenant=request.tenant, responded_at=time.time(), source="llm",
            content=f"re: {request.messages[-1].content}", model=request.model or "gpt-4o-mini", tier="small",
            finish_reason="stop", usage=TokenUsage(input_tokens=12, output_tokens=5)), 100)

    async def stop(self) -> None:
        pass


async def entry_api(pipeline: Pipeline, **entry: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Entry]]:
    client = FrugalClient("unused", settings=Settings(), transport=pipeline)
    await client.start()
    pricer = Pricer(Settings(), PriceCatalog.load(), TokenCounter())
    made = Entry(client, ApiKeys(KEYS), pricer, lambda tenant: ["auto"], **entry)
    transport = httpx.ASGITransport(app=build_app(made), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://entry") as api:
        yield api, made


async def until_sent(pipeline: Pipeline, count: int) -> None:
    async with asyncio.timeout(5):
        while len(pipeline.sent) < count:  # noqa: ASYNC110 (the fake has no event to wait on)
            await asyncio.sleep(0.01)


# --- Response headers: only what HTTP can carry ----------------------------------------------------------------


@pytest.mark.parametrize("pin", ["acme\u20ac/gpt-4o-mini", "a\r\nset-cookie: session=evil/gpt-4o-mini",
                                 "x\x00y/gpt-4o-mini"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_pinned_model_echoed_in_the_answer_never_breaks_nor_injects_headers(pin: str, stream: bool) -> None:
    """The catalog prices `anything/gpt-4o-mini` as `gpt-4o-mini`, so the pin is routed and paid, and the
    answer (and the baseline, a served pin) names it as sent. Non-Latin-1 text made Starlette raise (a 500 for
    an answer already paid, again on every retry); CR LF split the header block."""
    pipeline = Pipeline()
    async for api, _ in entry_api(pipeline):
        r = await api.post(URL, json={**ASK, "model": pin, "stream": stream}, headers=auth("key-a1", "pin-1"))
        assert r.status_code == 200, r.text[:300]
        assert "re: What" in r.text and "[DONE]" in r.text if stream else r.json()["choices"][0]["message"]["content"]
        assert "set-cookie" not in r.headers
        for name, value in r.headers.raw:
            assert all(0x20 <= c < 0x7f for c in value), (name, value)
        assert r.headers["x-frugal-model"].endswith("/gpt-4o-mini")
        assert r.headers["x-frugal-baseline-model"] == r.headers["x-frugal-model"], "the served pin is the baseline"
    assert len(pipeline.sent) == 1


def test_header_values_are_escaped_reversibly_and_plain_names_pass_unchanged() -> None:
    from urllib.parse import unquote

    from frugalstream.http_entry.app import header_value

    for name in ("gpt-4o-mini", "ft:gpt-4o-mini:org:custom:abc", "accounts/fireworks/models/llama-v3"):
        assert header_value(name) == name
    for odd in ("a\r\nb", "caf\u00e9 \u20ac", "100%/x", "\x00"):
        escaped = header_value(odd)
        assert escaped.isascii() and escaped.isprintable() and " " not in escaped and unquote(escaped) == odd


# --- Every waiting call counts: retries of one key are calls too -------------------------------------------------


async def test_retries_of_one_key_in_flight_count_against_the_entrys_waits() -> None:
    """A caller retrying one Idempotency-Key again and again while it is in flight opened a new waiting call
    (and a new send) each time, and the cap counted identities: it was never reached, so the entry held any
    number of connections and bodies. Calls are counted now; the retries are 429 at the cap."""
    pipeline = Pipeline()
    pipeline.hold = True
    async for api, entry in entry_api(pipeline, max_pending=3, timeout_s=5):
        held = [asyncio.create_task(api.post(URL, json=ASK, headers=auth("key-a1", "same"))) for _ in range(3)]
        await until_sent(pipeline, 3)
        assert entry.client.board.pending == 1 and sum(entry.waiting.values()) == 3
        over = await api.post(URL, json=ASK, headers=auth("key-a1", "same"))
        assert over.status_code == 429, over.text[:300]
        assert over.json()["error"]["code"] == "pipeline_behind" and 1 <= int(over.headers["retry-after"]) <= 30
        other = await api.post(URL, json=ASK, headers=auth("key-a2", "other"))
        assert other.status_code == 429, "a new call is refused too: the entry holds max_pending calls"
        assert len(pipeline.sent) == 3, "nothing more was sent"
        pipeline.answer(pipeline.sent[0])
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        pipeline.hold = False
        replay = await api.post(URL, json=ASK, headers=auth("key-a1", "same"))
    assert replay.status_code == 200 and len(pipeline.sent) == 3, "an answered call is replayed, not sent again"


# --- A slow broker: the caller's timeout holds ---------------------------------------------------------------


async def _ends_within(coro: Any, seconds: float) -> BaseException | None:
    """What the call raised when it ended within `seconds`; fails the test when it was still running."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task not in done:
        task.cancel()
        pytest.fail(f"still waiting after {seconds} s (the caller asked for far less)")
    return task.exception()


@pytest.mark.parametrize("where", ["send", "reader"])
async def test_a_broker_that_never_answers_ends_at_the_callers_timeout(where: str) -> None:
    """The send (and the answer reader's start) ran before the timeout began: a broker that takes the
    connection and never acknowledges held `complete(timeout_s=0.2)`, and every HTTP call, for as long as
    the producer kept retrying."""
    pipeline = Pipeline()
    client = FrugalClient("acme", settings=Settings(), transport=pipeline)
    await client.start(answers=where != "reader")
    pipeline.hang, pipeline.hang_reader = where == "send", where == "reader"
    raised = await _ends_within(client.complete("What are your hours?", timeout_s=0.2), 3)
    assert isinstance(raised, TimeoutError), raised
    assert client.board.pending == 0, "the caller that gave up is forgotten"


async def test_an_http_call_on_a_hung_broker_is_a_504_at_the_entrys_timeout() -> None:
    pipeline = Pipeline()
    pipeline.hang = True
    async for api, entry in entry_api(pipeline, timeout_s=0.2):
        raised = await _ends_within(api.post(URL, json=ASK, headers=auth("key-a1", "slow-1")), 3)
        assert raised is None
        assert not entry.waiting and entry.client.board.pending == 0


# --- No Idempotency-Key: a 504 or 503 must not be retried by the SDK ------------------------------------------


async def test_a_timeout_without_an_idempotency_key_tells_the_sdk_not_to_retry() -> None:
    """The openai SDK retries every 5xx (and sends no Idempotency-Key of its own): a retry of a call that timed
    out is a new request id, so the pipeline, still working on the first, would answer and bill both."""
    pipeline = Pipeline()
    pipeline.hold = True
    async for api, _ in entry_api(pipeline, timeout_s=0.1):
        keyless = await api.post(URL, json=ASK, headers=auth("key-a1"))
        keyed = await api.post(URL, json=ASK, headers=auth("key-a1", "job-7"))
    assert keyless.status_code == 504 and keyless.headers.get("x-should-retry") == "false"
    assert "send one" in keyless.json()["error"]["message"]
    assert keyed.status_code == 504 and keyed.headers.get("x-should-retry") != "false", (
        "with its key a retry is replayed, never paid again: the SDK may retry")


async def test_a_dead_reader_after_the_send_without_an_idempotency_key_tells_the_sdk_not_to_retry() -> None:
    pipeline = Pipeline()
    pipeline.hold = True
    async for api, entry in entry_api(pipeline, timeout_s=5):
        call = asyncio.create_task(api.post(URL, json=ASK, headers=auth("key-a1")))
        await until_sent(pipeline, 1)
        entry.client.board.fail_all(AnswerReaderFailed("the answer reader stopped: KafkaError"))
        r = await call
    assert r.status_code == 503 and r.headers.get("x-should-retry") == "false", r.headers


async def test_a_call_still_sending_its_body_counts_against_the_entrys_waits() -> None:
    """Bodies (up to max_message_bytes each) were read and parsed before the cap was looked at: any number of
    slow uploads were held in memory at once. A call counts from before its body is read now."""
    pipeline = Pipeline()
    more = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"model":"auto",'
        await more.wait()
        yield b'"messages":[{"role":"user","content":"What are your hours?"}]}'

    async for api, entry in entry_api(pipeline, max_pending=1, timeout_s=5):
        uploading = asyncio.create_task(api.post(URL, content=slow_body(), headers=auth("key-a1", "up-1")))
        async with asyncio.timeout(5):
            while not entry.waiting:  # noqa: ASYNC110 (the entry has no event to wait on)
                await asyncio.sleep(0.01)
        refused = await api.post(URL, json=ASK, headers=auth("key-a2", "up-2"))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "pipeline_behind"
        more.set()
        assert (await uploading).status_code == 200
        assert not entry.waiting, "counted until the call ended"
        assert (await api.post(URL, json=ASK, headers=auth("key-a2", "up-2"))).status_code == 200
