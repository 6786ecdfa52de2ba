"""What every provider adapter returns and raises, plus the HTTP error mapping they share.

Adapters turn every failure into a `ProviderError` with a `kind`, so retry, fallback and circuit-breaker
logic (`frugalstream.llm.resilience`) never needs to know which vendor or HTTP library it talks to.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
from pydantic import ValidationError

from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import ChatMessage, SamplingParams, TokenUsage, ToolCall
from frugalstream.schemas.requests import ToolChoice
from frugalstream.schemas.responses import MAX_TOKENS

ErrorKind = Literal["timeout", "rate_limited", "server", "client", "malformed", "connection", "circuit_open"]

# Kinds where the same request may succeed if simply sent again later.
RETRYABLE_KINDS: frozenset[ErrorKind] = frozenset({"timeout", "rate_limited", "server", "connection"})


@dataclass(frozen=True)
class Completion:
    """One model answer with the usage to price it.

    `model` is the model that was asked (the name routing and the price catalog know); `reported_model` is
    what the provider says answered (a dated snapshot, or the real model behind an Azure deployment name).
    `latency_ms` is the provider call only, not queueing or retries.
    """

    content: str
    model: str
    usage: TokenUsage
    finish_reason: str
    latency_ms: float
    simulated: bool
    tool_calls: tuple[ToolCall, ...] = ()
    reported_model: str | None = None


class ProviderError(Exception):
    """A failed provider call, classified so callers can decide to retry, fall back, or give up.

    `usage` is what the provider billed for the call when it answered (HTTP 200 with a usage block) with an
    answer that cannot be used: the call was paid for although it failed, and its spend must still be counted.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        status: int | None = None,
        usage: TokenUsage | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.retryable: bool = kind in RETRYABLE_KINDS if retryable is None else retryable
        self.retry_after_s = retry_after_s
        self.status = status
        self.usage = usage

    def __repr__(self) -> str:
        return f"ProviderError({self.args[0]!r}, kind={self.kind!r}, status={self.status})"


def billed(error: ProviderError, usage: TokenUsage | None,
           estimate: Callable[[], TokenUsage] | None = None) -> ProviderError:
    """`error` carrying the usage the provider reported with the answer it was raised for (unless it carries
    one already): an unusable answer that was billed is spend all the same. A malformed answer that reports no
    usage was still paid for its prompt: `estimate` gives that (an error body generated nothing: no spend)."""
    if usage is None and error.kind == "malformed" and estimate is not None:
        usage = estimate()
    if error.usage is None:
        error.usage = usage
    return error


class Provider(Protocol):
    """A chat-completion backend. Implementations own their HTTP client; call `aclose()` at shutdown."""

    name: str

    async def complete(
        self,
        *,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        max_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] = (),
        response_format: Mapping[str, Any] | None = None,
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Completion: ...

    async def aclose(self) -> None: ...


def resolve_api_key(api_key: str | None, env_var: str | None, key_file: str | os.PathLike[str] | None) -> str | None:
    """Explicit value, then a file (Kubernetes/Docker secrets), then the environment; never logged."""
    if api_key:
        return api_key
    if key_file:
        return Path(key_file).read_text(encoding="utf-8").strip() or None
    if env_var:
        return os.environ.get(env_var) or None
    return None


def build_timeout(timeout_s: float, connect_timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, connect=connect_timeout_s)


# --- Retry-After and rate-limit reset headers -------------------------------------------------------------

_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?!s))?(?:(?P<s>\d+(?:\.\d+)?)s)?"
                       r"(?:(?P<ms>\d+(?:\.\d+)?)ms)?$")
# (remaining, reset) header pairs: OpenAI sends durations ("6m0s", "20ms"), Anthropic RFC 3339 timestamps.
_RESET_PAIRS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
    ("anthropic-ratelimit-input-tokens-remaining", "anthropic-ratelimit-input-tokens-reset"),
    ("anthropic-ratelimit-output-tokens-remaining", "anthropic-ratelimit-output-tokens-reset"),
)


def _parse_delay(value: str, now: float) -> float | None:
    """Seconds until `value`, which may be seconds, a Go-style duration, an HTTP-date or an RFC 3339 time."""
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            return None
        return max(0.0, seconds - now if seconds > 1e9 else seconds)  # large numbers are epoch timestamps
    if (m := _DURATION.match(value)) and any(m.groupdict().values()):
        g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
        return g["h"] * 3600 + g["m"] * 60 + g["s"] + g["ms"] / 1000
    for parse in (parsedate_to_datetime, lambda v: datetime.fromisoformat(v.replace("Z", "+00:00"))):
        try:
            when = parse(value)
        except (TypeError, ValueError, IndexError):
            continue
        if when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    return None


def parse_retry_after(headers: httpx.Headers, now: float | None = None, *, resets: bool = True) -> float | None:
    """How long the provider asks us to wait, in seconds, or None if it does not say.

    `retry-after-ms` and `retry-after` win. Otherwise, if `resets` (only for a 429: OpenAI sends reset
    headers on every response), the reset time of the exhausted limit (remaining == 0) is used, or the
    latest reset if none is reported exhausted, since we cannot tell which limit was hit.
    """
    now = time.time() if now is None else now
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    if (ra := headers.get("retry-after")) is not None and (delay := _parse_delay(ra, now)) is not None:
        return delay
    if not resets:
        return None
    exhausted: list[float] = []
    any_reset: list[float] = []
    for remaining, reset in _RESET_PAIRS:
        if (value := headers.get(reset)) is None or (delay := _parse_delay(value, now)) is None:
            continue
        any_reset.append(delay)
        if headers.get(remaining, "").strip() == "0":
            exhausted.append(delay)
    chosen = exhausted or any_reset
    return max(chosen) if chosen else None


# --- HTTP failures → ProviderError ---------------------------------------------------------------------

_KEY_HEADERS = ("authorization", "api-key", "x-api-key")


def _credentials(response: httpx.Response) -> list[str]:
    """The credentials its request carried, longest first: what a provider (or a proxy) may echo back."""
    try:
        headers = response.request.headers
    except RuntimeError:  # a response built without its request
        return []
    values = [headers.get(name, "") for name in _KEY_HEADERS]
    found = {v for value in values for v in (value, value.removeprefix("Bearer ").strip()) if len(v) >= 8}
    return sorted(found, key=len, reverse=True)


def _redacted(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def _error_detail(response: httpx.Response) -> tuple[str, str]:
    """(error type/code, message) from the usual `{"error": {...}}` bodies; bounded, never the request, and
    never the API key (an error text reaches logs and the tenant's error answer; redacted before it is cut, so
    no prefix of a key survives either)."""
    secrets = _credentials(response)
    try:
        body = response.json()
    except JSON_ERRORS:
        return "", _redacted(response.text, secrets)[:200]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or ""
        return _redacted(str(code), secrets)[:100], _redacted(str(err.get("message", "")), secrets)[:300]
    return "", _redacted(str(err or ""), secrets)[:300]


def error_from_response(provider: str, response: httpx.Response) -> ProviderError:
    """Classify a non-2xx response. 429 with `insufficient_quota` is a billing wall, not a transient limit."""
    status = response.status_code
    code, message = _error_detail(response)
    text = f"{provider} HTTP {status}{f' {code}' if code else ''}: {message}".rstrip(": ")
    retry_after = parse_retry_after(response.headers, resets=status == 429)
    if status == 429:
        if code == "insufficient_quota":
            return ProviderError(text, kind="client", retryable=False, status=status)
        return ProviderError(text, kind="rate_limited", retry_after_s=retry_after, status=status)
    if status == 408:
        return ProviderError(text, kind="timeout", retry_after_s=retry_after, status=status)
    if status >= 500:  # includes Anthropic's 529 overloaded_error
        return ProviderError(text, kind="server", retry_after_s=retry_after, status=status)
    return ProviderError(text, kind="client", status=status)


def error_from_exception(provider: str, exc: httpx.HTTPError) -> ProviderError:
    """Transport failures: timeouts vs. connection problems (refused, reset, protocol errors)."""
    name = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return ProviderError(f"{provider} {name}", kind="timeout")
    return ProviderError(f"{provider} {name}: {str(exc)[:200]}", kind="connection")


#: What decoding a provider's JSON raises: bad syntax or encoding, and a body nested too deeply to decode.
JSON_ERRORS = (ValueError, RecursionError)


def parse_json_body(provider: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except JSON_ERRORS as exc:
        raise ProviderError(f"{provider} returned a non-JSON body", kind="malformed",
                            status=response.status_code) from exc
    if not isinstance(body, dict):
        raise ProviderError(f"{provider} returned JSON that is not an object", kind="malformed",
                            status=response.status_code)
    return body


def non_negative_int(value: Any) -> int | None:
    """Usage fields arrive as ints, nulls, or occasionally floats; anything else means 'not reported', as does a
    count no usage field may hold (NaN, infinite, over 10^11): one that cannot be true is estimated instead."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_TOKENS:
        return None
    return int(value)


def answer_tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    """A tool call of a provider's answer; one the contract cannot hold (an id or a name over 256 characters) is
    a malformed answer, not an exception that fails the whole batch it is in."""
    try:
        return ToolCall(id=call_id, name=name, arguments=arguments)
    except ValidationError as exc:
        raise ProviderError("tool call id or name is longer than the contract allows", kind="malformed") from exc


async def post_json(client: httpx.AsyncClient, provider: str, path: str, body: Mapping[str, Any]
                    ) -> tuple[httpx.Response, float]:
    """One provider call with its latency; transport failures and HTTP errors become `ProviderError`s."""
    started = time.perf_counter()
    try:
        response = await client.post(path, json=dict(body))
    except httpx.HTTPError as exc:
        raise error_from_exception(provider, exc) from exc
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code >= 400:
        raise error_from_response(provider, response)
    return response, latency_ms


def estimate_usage(counter: TokenCounter, model: str, messages: Sequence[ChatMessage], content: str,
                   calls: Sequence[ToolCall], tools: Sequence[Mapping[str, Any]] = ()) -> TokenUsage:
    """tiktoken counts for a response without usage (tool schemas as their JSON text); marked `estimated`."""
    prompt = counter.count_messages(messages, model)
    if tools:
        prompt += counter.count_text(json.dumps(list(tools), separators=(",", ":")), model)
    output = counter.count_text(content, model)
    output += sum(counter.count_text(c.name + c.arguments, model) for c in calls)
    return TokenUsage(input_tokens=prompt, output_tokens=output, estimated=True)


async def checked_request(client: httpx.AsyncClient, provider: str, method: str, path: str,
                          **kwargs: Any) -> httpx.Response:
    """One HTTP call to a provider's API; a transport failure or an error status becomes a `ProviderError`."""
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise error_from_exception(provider, exc) from exc
    if response.status_code >= 400:
        raise error_from_response(provider, response)
    return response
