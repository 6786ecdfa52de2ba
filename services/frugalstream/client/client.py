"""`FrugalClient` (async) and `SyncFrugalClient`: produce requests and await their answers over Kafka.

    async with FrugalClient(tenant="acme", bootstrap="127.0.0.1:9092") as client:
        request_id = await client.submit("Summarize our refund policy")   # fire and forget
        answer = await client.complete("What are your business hours?")   # the terminal LLMResponse

A failed request is an `LLMResponse` with `error` set (check `answer.ok`), as on `llm.responses`; only a
missing answer raises: `TimeoutError`, or `AnswerReaderFailed` (naming its cause) at once when the answer
reader died, since no answer can arrive then (the next call starts a new reader).

`reply_topic="acme.replies"` names it on every request and reads answers there instead of on `llm.responses`,
which carries every tenant's: what a principal limited to its own tenant's topics can use. The copy there is
best effort, and a reply topic the tenant's policy does not grant gets its error on `llm.responses` only: such
a call ends in `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from frugalstream.client.answers import AnswerBoard
from frugalstream.client.kafka import AnswerReaderFailed, KafkaTransport, OnAnswer
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse

T = TypeVar("T")
Prompt = str | Sequence[ChatMessage | dict[str, Any]] | LLMRequest


class Transport(Protocol):
    """What the client needs. A transport whose answer reader can die also has `on_reader_failure` (set by the
    client, called with the error) and `reader_failure()` (the error, until a new reader runs), as
    `KafkaTransport` does; one without them is taken never to lose its reader."""

    async def start(self, on_answer: OnAnswer | None) -> None: ...
    async def start_reader(self, on_answer: OnAnswer) -> None: ...
    async def send(self, request: LLMRequest) -> None: ...
    async def stop(self) -> None: ...


def check_timeout(value: float, name: str = "timeout_s") -> float:
    """A wait that can be met: finite and > 0. Checked before anything is sent, since a request produced for a
    caller that cannot wait is still answered, and paid for, with nobody reading it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return value


def build_request(prompt: Prompt, *, tenant: str, request_id: str | None = None, **fields: Any) -> LLMRequest:
    """An `LLMRequest` from a prompt (text, chat messages, or a whole request, whose tenant must match, sent as
    it is: an id or fields given beside it are refused rather than dropped). A missing id is a fresh random one;
    an empty one is refused (it is the idempotency key), not replaced."""
    if isinstance(prompt, LLMRequest):
        if request_id is not None or fields:
            given = ", ".join((["request_id"] if request_id is not None else []) + sorted(fields))
            raise ValueError(f"{given} cannot be given with a whole LLMRequest (it is sent as it is): "
                             "set them on the request (request.model_copy(update=...))")
        if prompt.tenant != tenant:
            raise ValueError(f"the request's tenant {prompt.tenant!r} is not this client's tenant {tenant!r}")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return LLMRequest.model_validate({
        "id": uuid.uuid4().hex if request_id is None else request_id, "tenant": tenant, "messages": messages,
        "created_at": time.time(), **fields,
    })


class FrugalClient:
    """One producer, and (once `complete` is used) one reader of every answer, shared by all calls.

    The board remembers only answers of identities asked through this client (for a retry with the same id);
    `remember_unasked=True` remembers every answer read (the HTTP entry's: a retry may reach another entry).
    """

    def __init__(self, tenant: str, *, bootstrap: str | None = None, settings: Settings | None = None,
                 transport: Transport | None = None, timeout_s: float = 120.0,
                 client_id: str = "frugalstream-client", remember_unasked: bool = False,
                 reply_topic: str | None = None) -> None:
        settings = settings or Settings()
        if bootstrap is not None:
            settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        self.tenant = tenant
        self.timeout_s = check_timeout(timeout_s)
        self.board = AnswerBoard(remember_unasked=remember_unasked)
        self.reply_topic = reply_topic
        self._transport: Transport = transport or KafkaTransport(settings, client_id=client_id,
                                                                 answers_topic=reply_topic)
        self._started = False
        self._reading: asyncio.Lock | None = None
        if hasattr(self._transport, "on_reader_failure"):
            self._transport.on_reader_failure = self._reader_failed

    async def start(self, *, answers: bool = True) -> None:
        """`answers=False` for a submit-only client: no answer reader is started until `complete` needs one.
        Starting a started client only starts the answer reader, if asked: never a second producer."""
        if not self._started:
            await self._transport.start(self._on_answer if answers else None)
            self._started = True
        elif answers:
            await self._start_reader()

    async def _start_reader(self) -> None:
        self._reading = self._reading or asyncio.Lock()
        async with self._reading:
            await self._transport.start_reader(self._on_answer)

    async def stop(self) -> None:
        await self._transport.stop()
        self.board.fail_all(ConnectionError("the client stopped"))
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _on_answer(self, response: LLMResponse, size: int) -> None:
        self.board.deliver(response, size)

    def _reader_failed(self, cause: BaseException) -> None:
        """The answer reader died: every waiting caller fails now, naming the cause, not at its timeout."""
        self.board.fail_all(AnswerReaderFailed.of(cause))

    def _check_reader(self) -> None:
        """Raises when no reader runs to see an answer (one that died and could not be replaced): a request
        sent now would only wait out its timeout."""
        reader_failure = getattr(self._transport, "reader_failure", None)
        cause = reader_failure() if reader_failure is not None else None
        if cause is not None:
            raise AnswerReaderFailed.of(cause)

    async def submit(self, prompt: Prompt, *, request_id: str | None = None, **fields: Any) -> str:
        """Produces the request (acknowledged by the broker) and returns its id; the answer goes to
        `llm.responses` (and the request's `reply_topic`, when its tenant's policy grants it)."""
        request = self._build(prompt, request_id, fields)
        await self.send(request)
        return request.id

    def _build(self, prompt: Prompt, request_id: str | None, fields: dict[str, Any]) -> LLMRequest:
        """`build_request`, naming this client's reply topic unless the prompt is a whole request."""
        if self.reply_topic is not None and not isinstance(prompt, LLMRequest):
            fields = {"reply_topic": self.reply_topic, **fields}
        request = build_request(prompt, tenant=self.tenant, request_id=request_id, **fields)
        self._check_reply_topic(request)
        return request

    def _check_reply_topic(self, request: LLMRequest) -> None:
        if self.reply_topic is not None and request.reply_topic != self.reply_topic:
            raise ValueError(f"this client reads its answers on {self.reply_topic!r}: a request it sends must name "
                             f"it as reply_topic (this one names {request.reply_topic!r})")

    async def send(self, request: LLMRequest) -> None:
        if not self._started:
            raise RuntimeError("start the client first (or use `async with`)")
        await self._transport.send(request)

    async def complete(self, prompt: Prompt, *, request_id: str | None = None, timeout_s: float | None = None,
                       **fields: Any) -> LLMResponse:
        """Produces the request and returns its terminal answer; `TimeoutError` if none came in time."""
        return await self.ask(self._build(prompt, request_id, fields), timeout_s=timeout_s)

    async def ask(self, request: LLMRequest, *, timeout_s: float | None = None) -> LLMResponse:
        """`complete` for a ready request of any tenant (the HTTP entry's path): registered before it is sent,
        answered from the recent answers when this identity was answered a moment ago. The timeout covers
        the reader's start and the send too: a broker that takes the connection and never acknowledges
        would hold the caller for as long as the producer retries."""
        wait_s = check_timeout(self.timeout_s if timeout_s is None else timeout_s)
        self._check_reply_topic(request)
        if not self._started:
            raise RuntimeError("start the client first (or use `async with`)")
        async with asyncio.timeout(wait_s):
            return await self._ask(request)

    async def _ask(self, request: LLMRequest) -> LLMResponse:
        await self._start_reader()
        if not self._started:  # stopped while the reader started: nothing may be sent (nor a reader left)
            raise ConnectionError("the client stopped")
        future = self.board.expect(request.tenant, request.id)
        try:
            if not future.done():
                self._check_reader()
                await self._transport.send(request)
            return await future
        finally:
            self.board.forget(request.tenant, request.id, future)


class SyncFrugalClient:
    """`FrugalClient` for code without an event loop: the client runs on its own loop in a daemon thread."""

    def __init__(self, tenant: str, **options: Any) -> None:
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frugalstream-client", daemon=True)
        self._thread.start()
        try:
            self._client = self._run(self._make(tenant, options))
        except BaseException:  # a bad option: nobody gets an object to close, so the loop thread ends here
            self._end_loop()
            raise

    @staticmethod
    async def _make(tenant: str, options: dict[str, Any]) -> FrugalClient:
        return FrugalClient(tenant, **options)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()  # never scheduled: closed here rather than warned about as never awaited
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self, *, answers: bool = True) -> None:
        self._run(self._client.start(answers=answers))

    def submit(self, prompt: Prompt, **fields: Any) -> str:
        return self._run(self._client.submit(prompt, **fields))

    def complete(self, prompt: Prompt, **fields: Any) -> LLMResponse:
        return self._run(self._client.complete(prompt, **fields))

    def close(self) -> None:
        """Stops the client and ends its loop thread; closing again does nothing (a `close()` inside a `with`)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.stop())
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:  # __exit__ will not run: the loop thread must not outlive the failed start
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
