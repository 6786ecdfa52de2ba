"""OpenAI Chat Completions bodies in, `LLMRequest`s out; `LLMResponse`s in, OpenAI completions (or chunks) out.

The request contract already reads OpenAI's message and sampling shapes; this module handles what only the
HTTP face has (`stream`, `metadata`, `user`) and refuses, naming the parameter, what frugalstream cannot
honour, instead of silently answering something else. Identity fields (`tenant`, `id`, `reply_topic`) come
from the API key and the `Idempotency-Key` header, never from the body.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from frugalstream.schemas import LLMRequest, LLMResponse, wire_bytes
from frugalstream.schemas.requests import checked_tags

#: Frugalstream's own fields an HTTP caller may send (`extra_body` in the openai SDK).
EXTENSIONS = frozenset({"cache", "task_hint", "tags"})
#: Read by the contract as OpenAI spells them.
CONTRACT = frozenset({"messages", "model", "temperature", "top_p", "seed", "stop", "max_tokens",
                      "max_completion_tokens", "n", "tools", "tool_choice", "parallel_tool_calls",
                      "response_format"})
#: Handled here.
HTTP_ONLY = frozenset({"stream", "stream_options", "metadata", "user", "prompt_cache_key", "safety_identifier"})
#: Accepted only at the value that changes nothing; any other value cannot be honoured.
NEUTRAL: Mapping[str, tuple[object, ...]] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "store": (None, False),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]), "reasoning_effort": (None,),
    "prediction": (None,), "audio": (None,), "functions": (None,), "function_call": (None,),
    "web_search_options": (None,), "verbosity": (None,),
}
#: Set by the key and the headers.
IDENTITY = frozenset({"tenant", "id", "reply_topic", "created_at", "schema_version", "sampling"})
AUTO_MODEL = "auto"


class BadRequest(ValueError):
    """A body frugalstream cannot honour; `param` names the field, as OpenAI's errors do. `status` is 400, or
    413 for a request over the message limit (which no retry of the same body fixes)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_request", status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


def with_key_tags(request: LLMRequest, fixed: Mapping[str, str]) -> LLMRequest:
    """The request with the tags its API key sets (see `keys`); a different value the caller sent for one of them
    is refused, not overwritten, so the caller learns its tag did not apply."""
    if not fixed:
        return request
    if clash := sorted(k for k, v in fixed.items() if request.tags.get(k, v) != v):
        raise BadRequest(f"tag {clash[0]!r} is set by this API key ({clash[0]}={fixed[clash[0]]}); leave it out",
                         "metadata")
    try:
        merged = checked_tags({**request.tags, **fixed})
    except ValueError as exc:
        raise BadRequest(f"{exc}, counting those this API key sets", "metadata") from None
    return request.model_copy(update={"tags": merged})


def too_large(size: int, limit: int, what: str = "the request") -> BadRequest:
    return BadRequest(f"{what} is {size} bytes, over the {limit}-byte limit (max_message_bytes)", None,
                      "request_too_large", 413)


def _param(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def to_request(body: Any, *, tenant: str, request_id: str,
               max_bytes: int | None = None) -> tuple[LLMRequest, bool, bool]:
    """(request, stream, include_usage_in_stream) for an OpenAI Chat Completions body.

    The request is serialized once here, as the transport will serialize it: text JSON reads but UTF-8
    cannot encode (a lone surrogate escape such as \\ud800) is a 400 now rather than a failure at send, and a
    request over `max_bytes` as a message (defaults fill every message, so it may outgrow its body) is a 413
    instead of a send the broker refuses or an answer `too_large` later."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", None)
    for name, value in body.items():
        if name in IDENTITY:
            raise BadRequest(f"{name} cannot be set in the body: the API key and the Idempotency-Key header "
                             "decide who asks and under which id", name, "unsupported_parameter")
        if name in NEUTRAL and value not in NEUTRAL[name]:
            raise BadRequest(f"{name}={json.dumps(value)[:80]} is not supported by frugalstream; leave it out",
                             name, "unsupported_parameter")
        if name not in NEUTRAL and name not in CONTRACT | HTTP_ONLY | EXTENSIONS:
            raise BadRequest(f"unknown parameter {name}", name, "unknown_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    fields = {k: v for k, v in body.items() if k in CONTRACT | EXTENSIONS and not (k == "model" and v == AUTO_MODEL)}
    # Checked before dict(): dict(["ab"]) reads as {"a": "b"} and dict("vip") raises, neither a clear 400.
    tags, metadata = fields.pop("tags", None), body.get("metadata")
    for name, value in (("tags", tags), ("metadata", metadata)):
        if value is not None and not isinstance(value, dict):
            raise BadRequest(f"{name} must be an object of strings", name)
    tags = {**(tags or {}), **(metadata or {})}
    if isinstance(body.get("user"), str):
        tags["user"] = body["user"][:256]
    try:
        request = LLMRequest.model_validate({**fields, "tags": tags, "id": request_id, "tenant": tenant,
                                             "created_at": time.time()})
        size = wire_bytes(request)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{param}: {message}" if param else message, param) from None
    except PydanticSerializationError as exc:
        problem = ("text that is not valid Unicode (a lone surrogate escape such as \\ud800): send each character "
                   "whole" if "surrogate" in str(exc) else "values nested too deeply to send")
        raise BadRequest(f"the body holds {problem}", None) from None
    if max_bytes is not None and size > max_bytes:
        raise too_large(size, max_bytes, "the request as a message")
    return request, stream, bool(options.get("include_usage"))


def usage_body(response: LLMResponse) -> dict[str, Any]:
    """OpenAI's usage: prompt tokens include cached reads and writes, completion tokens include reasoning.
    An answer from cache or a coalesced twin billed nothing, so its usage is zero."""
    u = response.usage
    if u is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    prompt = u.input_tokens + u.cached_input_tokens + u.cache_write_tokens
    completion = u.output_tokens + u.reasoning_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def _tool_calls(response: LLMResponse) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in response.tool_calls]


def _finish(response: LLMResponse) -> str:
    reason = response.finish_reason or "stop"
    return "tool_calls" if response.tool_calls and reason in ("stop", "tool_use") else reason


def completion_body(response: LLMResponse, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": response.content if response.content or not
                               response.tool_calls else None, "refusal": None}
    if response.tool_calls:
        message["tool_calls"] = _tool_calls(response)
    return {
        "id": f"chatcmpl-{response.request_id}", "object": "chat.completion", "created": created,
        "model": response.model or AUTO_MODEL, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(response), "logprobs": None}],
        "usage": usage_body(response),
    }


def _pieces(text: str, words: int = 8) -> Iterator[str]:
    """The answer in a few-word deltas (whitespace kept), the way streamed tokens arrive."""
    parts = text.split(" ")
    for i in range(0, len(parts), words):
        yield " ".join(parts[i:i + words]) + (" " if i + words < len(parts) else "")


def stream_chunks(response: LLMResponse, created: int, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The chat.completion.chunk objects of one answer, ending with the finish reason (and usage when asked)."""
    base = {"id": f"chatcmpl-{response.request_id}", "object": "chat.completion.chunk", "created": created,
            "model": response.model or AUTO_MODEL, "system_fingerprint": None}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return {**out, "usage": None} if include_usage else out

    yield chunk({"role": "assistant", "content": ""})
    for piece in _pieces(response.content or ""):
        if piece:
            yield chunk({"content": piece})
    if response.tool_calls:
        yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(_tool_calls(response))]})
    yield chunk({}, _finish(response))
    if include_usage:
        yield {**base, "choices": [], "usage": usage_body(response)}
