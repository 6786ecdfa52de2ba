"""`FrugalClient` (async) and `SyncFrugalClient`: produce requests and await their answers over Kafka.

    async with FrugalClient(tenant="acme", bootstrap="127.0.0.1:9092") as client:
        request_id = await client.submit("Summarize our refund policy")   # fire and forget
        answer = await client.complete("What are your business hours?")   # the terminal LLMResponse

A failed request is an `LLMResponse` with `error` set (check `answer.ok`), as on `llm.responses`; only a
missing answer raises: `TimeoutError`, or `AnswerReaderFailed` (naming its cause) at once when the answer
reader died, since no answer can arrive then (the next call starts a new reader).
"""

from __future__ import annotations

import asyncio
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


def build_request(prompt: Prompt, *, tenant: str, request_id: str | None = None, **fields: Any) -> LLMRequest:
    """An `LLMRequest` from a prompt (text, chat messages, or a whole request, whose tenant must match)."""
    if isinstance(prompt, LLMRequest):
        if prompt.tenant != tenant:
            raise ValueError(f"the request's tenant {prompt.tenant!r} is not this client's tenant {tenant!r}")
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return LLMRequest.model_validate({
        "id": request_id or uuid.uuid4().hex, "tenant": tenant, "messages": messages, "created_at": time.time(),
        **fields,
    })


class FrugalClient:
    """One producer, and (once `complete` is used) one reader of every answer, shared by all calls."""

    def __init__(self, tenant: str, *, bootstrap: str | None = None, settings: Settings | None = None,
                 transport: Transport | None = None, timeout_s: float = 120.0,
                 client_id: str = "frugalstream-client") -> None:
        settings = settings or Settings()
        if bootstrap is not None:
            settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        self.tenant = tenant
        self.timeout_s = timeout_s
        self.board = AnswerBoard()
        self._transport: Transport = transport or KafkaTransport(settings, client_id=client_id)
        self._started = False
        self._reading: asyncio.Lock | None = None
        if hasattr(self._transport, "on_reader_failure"):
            self._transport.on_reader_failure = self._reader_failed

    async def start(self, *, answers: bool = True) -> None:
        """`answers=False` for a submit-only client: no answer reader is started until `complete` needs one."""
        await self._transport.start(self._on_answer if answers else None)
        self._started = True

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
        request = build_request(prompt, tenant=self.tenant, request_id=request_id, **fields)
        await self.send(request)
        return request.id

    async def send(self, request: LLMRequest) -> None:
        if not self._started:
            raise RuntimeError("start the client first (or use `async with`)")
        await self._transport.send(request)

    async def complete(self, prompt: Prompt, *, request_id: str | None = None, timeout_s: float | None = None,
                       **fields: Any) -> LLMResponse:
        """Produces the request and returns its terminal answer; `TimeoutError` if none came in time."""
        return await self.ask(build_request(prompt, tenant=self.tenant, request_id=request_id, **fields),
                              timeout_s=timeout_s)

    async def ask(self, request: LLMRequest, *, timeout_s: float | None = None) -> LLMResponse:
        """`complete` for a ready request of any tenant (the HTTP entry's path): registered before it is sent,
        answered from the recent answers when this identity was answered a moment ago."""
        if not self._started:
            raise RuntimeError("start the client first (or use `async with`)")
        self._reading = self._reading or asyncio.Lock()
        async with self._reading:
            await self._transport.start_reader(self._on_answer)
        future = self.board.expect(request.tenant, request.id)
        try:
            if not future.done():
                self._check_reader()
                await self._transport.send(request)
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                return await future
        finally:
            self.board.forget(request.tenant, request.id, future)


class SyncFrugalClient:
    """`FrugalClient` for code without an event loop: the client runs on its own loop in a daemon thread."""

    def __init__(self, tenant: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frugalstream-client", daemon=True)
        self._thread.start()
        self._client = self._run(self._make(tenant, options))

    @staticmethod
    async def _make(tenant: str, options: dict[str, Any]) -> FrugalClient:
        return FrugalClient(tenant, **options)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self, *, answers: bool = True) -> None:
        self._run(self._client.start(answers=answers))

    def submit(self, prompt: Prompt, **fields: Any) -> str:
        return self._run(self._client.submit(prompt, **fields))

    def complete(self, prompt: Prompt, **fields: Any) -> LLMResponse:
        return self._run(self._client.complete(prompt, **fields))

    def close(self) -> None:
        try:
            self._run(self._client.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
