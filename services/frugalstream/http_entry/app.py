"""The Starlette app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`.

Per call: the API key names the tenant (401 otherwise), the body becomes an `LLMRequest` (400 naming the
parameter it cannot honour), the `Idempotency-Key` header becomes its id, and the call waits for the terminal
answer on `llm.responses`, which it returns in OpenAI's shape (as server-sent events with `stream: true`) with
`x-frugal-*` headers: source, model, tier, cost and saving. When this entry already waits on
`http_max_pending` answers the pipeline is behind: 429 with Retry-After, instead of a queue without end.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from frugalstream.client import FrugalClient
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.openai_shape import (
    AUTO_MODEL,
    BadRequest,
    completion_body,
    stream_chunks,
    to_request,
)
from frugalstream.http_entry.pricing import Pricer
from frugalstream.runtime.logging import get_logger
from frugalstream.schemas import LLMRequest, LLMResponse

log = get_logger(__name__)

_IDEMPOTENCY = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: the contract's id limit
INLINE_JSON_BYTES = 256 * 1024
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
    """What the routes share: the Kafka client, keys, pricing, the models to list, the bounds."""

    client: FrugalClient
    keys: ApiKeys
    pricer: Pricer | None
    models: Callable[[str], list[str]]  # tenant -> what it may name in `model`
    max_pending: int = 1000
    timeout_s: float = 120.0


def error(status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def retry_after(pending: int, rate: float) -> int:
    """Seconds until this entry's backlog would drain at the rate answers arrive (1-30 s)."""
    return 30 if rate <= 0 else max(1, min(30, math.ceil(pending / rate)))


async def _json(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw) if len(raw) <= INLINE_JSON_BYTES else await asyncio.to_thread(json.loads, raw)
    except ValueError:
        raise BadRequest("the body is not valid JSON", None) from None


def _headers(response: LLMResponse, request_id: str) -> dict[str, str]:
    out = {"x-frugal-request-id": request_id, "x-frugal-source": response.source}
    for name, value in (("model", response.model), ("tier", response.tier), ("task-type", response.task_type)):
        if value:
            out[f"x-frugal-{name}"] = value
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
                    "x-frugal-baseline-model": estimate.baseline_model})


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


async def chat_completions(request: Request) -> Response:
    started = time.perf_counter()
    entry: Entry = request.app.state.entry
    tenant = entry.keys.tenant(request.headers.get("authorization"))
    if tenant is None:
        return error(401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_request_error",
                     code="invalid_api_key")
    request_id = request.headers.get("idempotency-key") or uuid.uuid4().hex
    if not _IDEMPOTENCY.match(request_id):
        return error(400, "Idempotency-Key must be 1-128 printable ASCII characters without spaces",
                     "invalid_request_error", param="Idempotency-Key")
    try:
        llm_request, stream, include_usage = to_request(await _json(request), tenant=tenant, request_id=request_id)
    except BadRequest as exc:
        return error(400, str(exc), "invalid_request_error", param=exc.param, code=exc.code)
    board = entry.client.board
    if board.pending >= entry.max_pending and board.recent(tenant, request_id) is None:
        wait = retry_after(board.pending, board.answer_rate())
        log.warning("http_behind", pending=board.pending, retry_after_s=wait)
        return error(429, f"frugalstream is behind ({board.pending} requests waiting); retry in {wait} s",
                     "rate_limit_error", code="pipeline_behind", headers={"retry-after": str(wait)})
    asked = time.perf_counter()
    try:
        answer = await entry.client.ask(llm_request, timeout_s=entry.timeout_s)
    except TimeoutError:
        return error(504, f"no answer within {entry.timeout_s:g} s; retry with the same Idempotency-Key "
                          f"({request_id}) to get it when it comes", "timeout", code="timeout",
                     headers={"x-frugal-request-id": request_id})
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


def build_app(entry: Entry) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])
    app.state.entry = entry
    return app


def listed_models(tier_models: Sequence[str], allowed: Sequence[str] | None, catalog: Sequence[str]) -> list[str]:
    """`auto` first, then what a pin may name: the allowed models when policy limits them, else the tier
    models and every priced model."""
    named = list(allowed) if allowed is not None else [*tier_models, *sorted(catalog)]
    return [AUTO_MODEL, *dict.fromkeys(m for m in named if m != AUTO_MODEL)]
