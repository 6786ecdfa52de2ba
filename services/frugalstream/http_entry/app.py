"""The Starlette app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`.

Per call: the API key names the tenant (401 otherwise), the body becomes an `LLMRequest` (400 naming the
parameter it cannot honour; 413 over `max_message_bytes`, checked before the body is read whole), the
`Idempotency-Key` header becomes its id, and the call waits for the terminal answer on `llm.responses`, which
it returns in OpenAI's shape (as server-sent events with `stream: true`) with `x-frugal-*` headers: source,
model, tier, cost and saving. A key another call (another API key, another body) already holds is a 409 and
nothing is sent (see `idempotency`). When this entry already holds `http_max_pending` calls (reading their
bodies or waiting on answers, retries of one key each counted) the pipeline is behind: 429 with Retry-After,
instead of a queue without end; one tenant holding its share of them gets the 429 alone, so it cannot starve
the others. Every error, unknown paths and methods included, is a JSON body in
OpenAI's error shape: the SDKs parse it, a plain-text page they cannot.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from aiokafka.errors import MessageSizeTooLargeError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from frugalstream.client import AnswerReaderFailed, FrugalClient
from frugalstream.http_entry.idempotency import (
    BOARD_REMEMBER,
    BOARD_REMEMBER_S,
    KEY_MAX,
    KeyBindings,
    caller_request_id,
    fingerprint,
)
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.openai_shape import (
    AUTO_MODEL,
    BadRequest,
    completion_body,
    stream_chunks,
    to_request,
    too_large,
    with_key_tags,
)
from frugalstream.http_entry.pricing import Pricer
from frugalstream.runtime.logging import get_logger
from frugalstream.schemas import LLMRequest, LLMResponse

log = get_logger(__name__)

_IDEMPOTENCY = re.compile(rf"^[\x21-\x7e]{{1,{KEY_MAX}}}$")  # printable ASCII, no spaces; see caller_request_id
INLINE_JSON_BYTES = 256 * 1024
#: What a header value keeps as it is: printable ASCII but space and `%` (which escapes the rest).
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7f) if chr(c) != "%")
#: HTTP status per terminal error code, and whether the openai SDK should retry it (`x-should-retry`).
STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"), "too_large": (400, "invalid_request_error"),
    "unpriced_model": (400, "invalid_request_error"), "policy_denied": (403, "permission_error"),
    "shared_scope_denied": (403, "permission_error"), "reply_topic_denied": (403, "permission_error"),
    "budget_exceeded": (429, "insufficient_quota"), "timeout": (504, "timeout"),
    "circuit_open": (503, "server_error"), "provider_error": (502, "server_error"),
    "delivery_failed": (502, "server_error"),
}


@dataclass
class Entry:
    """What the routes share: the Kafka client, keys, pricing, the models to list, the bounds.

    `max_body_bytes` is the settings' `max_message_bytes` (its default here): a body over it cannot become a
    message the pipeline reads. `tenant_max_pending` caps one tenant's waiting calls (None: no cap)."""

    client: FrugalClient
    keys: ApiKeys
    pricer: Pricer | None
    models: Callable[[str], list[str]]  # tenant -> what it may name in `model`
    max_pending: int = 1000
    timeout_s: float = 120.0
    max_body_bytes: int = 1_000_000
    tenant_max_pending: int | None = None
    waiting: Counter[str] = field(default_factory=Counter, init=False)  # tenant -> calls waiting on this entry
    bindings: KeyBindings = field(init=False)

    def __post_init__(self) -> None:
        self.bindings = KeyBindings(remember=BOARD_REMEMBER + self.max_pending,
                                    remember_s=BOARD_REMEMBER_S + self.timeout_s)


def _utf8(text: str | None) -> str | None:
    """Text a body put in an error (a parameter's name) may hold a lone surrogate, which UTF-8 cannot encode:
    escaped, so the error itself can be sent."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error(status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": _utf8(message), "type": kind, "param": _utf8(param), "code": code}},
                        status_code=status, headers=headers)


def retry_after(pending: int, rate: float) -> int:
    """Seconds until this entry's backlog would drain at the rate answers arrive (1-30 s)."""
    return 30 if rate <= 0 else max(1, min(30, math.ceil(pending / rate)))


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its Content-Length before any of it is read, and while it is read when the
    length is absent or understated: an oversized body is never held whole in memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared) if declared.isascii() and declared.isdigit() else -1
        except ValueError:  # more digits than int() reads: no body that long is accepted anyway
            length = limit + 1
        if length < 0:
            raise BadRequest("Content-Length must be a number of bytes", None)
        if length > limit:
            raise too_large(length, limit, "the body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, "the body")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request, limit: int) -> object:
    raw = await _body(request, limit)
    try:
        return json.loads(raw) if len(raw) <= INLINE_JSON_BYTES else await asyncio.to_thread(json.loads, raw)
    except ValueError:
        raise BadRequest("the body is not valid JSON", None) from None


def header_value(text: str) -> str:
    """`text` percent-encoded (as UTF-8) outside printable ASCII. A model name comes back as the caller pinned
    it (the catalog prices `<anything>/gpt-4o` as `gpt-4o`) or as a provider named it: CR LF would split the
    header block and text Latin-1 cannot encode makes Starlette raise, a 500 for an answer already paid."""
    return quote(text, safe=_HEADER_SAFE)


def _headers(response: LLMResponse, request_id: str) -> dict[str, str]:
    out = {"x-frugal-request-id": request_id, "x-frugal-source": response.source}
    for name, value in (("model", response.model), ("tier", response.tier), ("task-type", response.task_type)):
        if value:
            out[f"x-frugal-{name}"] = header_value(value)
    if response.simulated:
        out["x-frugal-simulated"] = "true"
    return out


async def _priced(entry: Entry, request: LLMRequest, response: LLMResponse, headers: dict[str, str]) -> None:
    if entry.pricer is None or not response.ok:
        return
    estimate = await asyncio.to_thread(entry.pricer.estimate, request, response)
    headers.update({"x-frugal-cost-usd": f"{estimate.cost_usd:.8f}",
                    "x-frugal-baseline-usd": f"{estimate.baseline_usd:.8f}",
                    "x-frugal-saving-usd": f"{estimate.saving_usd:.8f}",
                    "x-frugal-baseline-model": header_value(estimate.baseline_model)})


def _error_answer(response: LLMResponse, headers: dict[str, str]) -> JSONResponse:
    assert response.error is not None
    status, kind = STATUS.get(response.error.code, (502, "server_error"))
    if response.error.code == "budget_exceeded":
        headers["x-should-retry"] = "false"  # a refused budget does not pass by retrying
    param = "model" if response.error.code == "unpriced_model" else None
    return error(status, response.error.message, kind, param=param, code=response.error.code, headers=headers)


async def _sse(response: LLMResponse, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    for chunk in stream_chunks(response, created, include_usage):
        yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _behind(entry: Entry, tenant: str, request_id: str) -> Response | None:
    """429 when this entry already holds `max_pending` waiting calls, or this tenant its share of them; None
    when the call may wait (an answer already given is replayed: it waits on nothing). Calls, not identities:
    each retry of a key in flight holds a connection and a body of its own."""
    board = entry.client.board
    if board.recent(tenant, request_id) is not None:
        return None
    if (calls := entry.waiting.total()) >= entry.max_pending:
        wait = retry_after(calls, board.answer_rate())
        log.warning("http_behind", pending=calls, retry_after_s=wait)
        return error(429, f"frugalstream is behind ({calls} requests waiting); retry in {wait} s",
                     "rate_limit_error", code="pipeline_behind", headers={"retry-after": str(wait)})
    held = entry.waiting[tenant]
    if entry.tenant_max_pending is not None and held >= entry.tenant_max_pending:
        wait = retry_after(held, board.answer_rate())
        log.warning("http_tenant_behind", tenant=tenant, waiting=held, retry_after_s=wait)
        return error(429, f"this tenant already waits on {held} answers, its share of this entry; retry in {wait} s",
                     "rate_limit_error", code="tenant_pending_limit", headers={"retry-after": str(wait)})
    return None


def _unanswered_retry(chosen: str | None) -> dict[str, str]:
    """For a call that may have been sent and is not answered: without an Idempotency-Key, a retry is a new
    request id the pipeline answers and bills besides the first, so the openai SDK (which retries every 5xx
    and sends no key of its own) is told not to; with one, a retry is replayed and may go ahead."""
    return {} if chosen else {"x-should-retry": "false"}


async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    entry: Entry = request.app.state.entry
    caller = entry.keys.caller(request.headers.get("authorization"))
    if caller is None:
        return error(401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_request_error",
                     code="invalid_api_key")
    tenant, api_key = caller
    chosen = request.headers.get("idempotency-key")
    if chosen is not None and not _IDEMPOTENCY.match(chosen):
        return error(400, f"Idempotency-Key must be 1-{KEY_MAX} printable ASCII characters without spaces",
                     "invalid_request_error", param="Idempotency-Key")
    request_id = caller_request_id(api_key, chosen or uuid.uuid4().hex)
    # A call counts from before its body is read: the bodies held in memory are bounded by the cap too.
    if (refused := _behind(entry, tenant, request_id)) is not None:
        return refused
    entry.waiting[tenant] += 1
    try:
        return await _call(entry, request, _Caller(tenant, api_key, chosen, request_id), started)
    finally:
        entry.waiting[tenant] -= 1
        if entry.waiting[tenant] <= 0:
            del entry.waiting[tenant]


@dataclass(frozen=True)
class _Caller:
    tenant: str
    api_key: bytes  # the key's digest
    chosen: str | None  # the Idempotency-Key it sent
    request_id: str


async def _call(entry: Entry, request: Request, caller: _Caller, started: float) -> Response:
    """One admitted call: its body read and checked, sent unless it reuses a key, and its answer returned."""
    tenant, api_key, chosen, request_id = caller.tenant, caller.api_key, caller.chosen, caller.request_id
    try:
        body = await _json(request, entry.max_body_bytes)
        llm_request, stream, include_usage = to_request(body, tenant=tenant, request_id=request_id,
                                                        max_bytes=entry.max_body_bytes)
        llm_request = with_key_tags(llm_request, entry.keys.fixed_tags(api_key))
    except BadRequest as exc:
        return error(exc.status, str(exc), "invalid_request_error", param=exc.param, code=exc.code)
    except RecursionError:  # the parser, the checks and the contract recurse per level: 5000 brackets are 10 kB
        return error(400, "the body is nested too deeply", "invalid_request_error", code="invalid_request")
    # Only a key the caller chose can collide: a replay or a shared wait is for a retry of the same call.
    print_ = fingerprint(api_key, llm_request) if chosen else b""
    claim = entry.bindings.claim(tenant, request_id, print_) if chosen else "new"
    if claim == "reused":
        log.info("http_idempotency_key_reused", tenant=tenant)
        return error(409, f"Idempotency-Key {chosen} was already used by this API key for another request "
                          "(another body); use a new key for a new request", "invalid_request_error",
                     param="Idempotency-Key", code="idempotency_key_reused", headers={"x-should-retry": "false"})
    asked = time.perf_counter()
    try:
        answer = await entry.client.ask(llm_request, timeout_s=entry.timeout_s)
    except TimeoutError:
        return error(504, f"no answer within {entry.timeout_s:g} s; retry with the same Idempotency-Key "
                          f"({chosen or 'send one'}) to get it when it comes", "timeout", code="timeout",
                     headers={"x-frugal-request-id": request_id, **_unanswered_retry(chosen)})
    except AnswerReaderFailed:  # the client tells its callers at once rather than at the timeout
        return error(503, "frugalstream cannot read answers right now; retry with the same Idempotency-Key "
                          f"({chosen or 'send one'})", "server_error", code="answers_unavailable",
                     headers={"x-frugal-request-id": request_id, "retry-after": "5", **_unanswered_retry(chosen)})
    except MessageSizeTooLargeError:  # the producer's or the broker's limit, below what was checked here
        if claim == "new":
            entry.bindings.release(tenant, request_id, print_)  # nothing was sent under the key
        return error(413, "the request is larger than the broker accepts as one message; send less",
                     "invalid_request_error", code="request_too_large")
    headers = _headers(answer, request_id)
    if not answer.ok:
        return _error_answer(answer, headers)
    answered = time.perf_counter()
    await _priced(entry, llm_request, answer, headers)
    # The entry's own time (parse, check, price) apart from the wait for the pipeline, in Server-Timing's form.
    own_ms = (asked - started + time.perf_counter() - answered) * 1000
    headers["server-timing"] = f"entry;dur={own_ms:.2f}, pipeline;dur={(answered - asked) * 1000:.2f}"
    created = int(answer.responded_at or time.time())
    if stream:
        return StreamingResponse(_sse(answer, created, include_usage), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    return JSONResponse(completion_body(answer, created), headers=headers)


async def list_models(request: Request) -> Response:
    entry: Entry = request.app.state.entry
    tenant = entry.keys.tenant(request.headers.get("authorization"))
    if tenant is None:
        return error(401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_request_error",
                     code="invalid_api_key")
    return JSONResponse({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "frugalstream"} for m in entry.models(tenant)]})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (an unknown path, a wrong method) in OpenAI's shape: the SDKs parse JSON only."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    message: str = str(exc.detail)
    code: str | None = None
    if exc.status_code == 404:
        message, code = f"Invalid URL ({where})", "unknown_url"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("allow", "")
        message, code = f"Method not allowed ({where}); allowed: {allowed}", "method_not_allowed"
    return error(exc.status_code, message, "invalid_request_error", code=code,
                 headers=dict(exc.headers) if exc.headers else None)


async def _server_error(request: Request, exc: Exception) -> Response:
    """An unforeseen failure still answers in OpenAI's shape (Starlette logs and re-raises it after)."""
    return error(500, "internal error in frugalstream's HTTP entry", "server_error", code="internal_error")


def build_app(entry: Entry) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.entry = entry
    return app


def listed_models(tier_models: Sequence[str], allowed: Sequence[str] | None, catalog: Sequence[str]) -> list[str]:
    """`auto` first, then what a pin may name: the allowed models when policy limits them, else the tier
    models and every priced model."""
    named = list(allowed) if allowed is not None else [*tier_models, *sorted(catalog)]
    return [AUTO_MODEL, *dict.fromkeys(m for m in named if m != AUTO_MODEL)]
