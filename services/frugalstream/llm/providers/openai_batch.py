"""OpenAI Batch API client: upload a JSONL file, create a batch, poll it, download its output and error files.

Batch work is billed at half the standard rate and finishes within a completion window (24 h), so it fits
backfills and deferrable requests. This module only speaks the protocol; deciding *when* to use it, and resuming a
batch after a restart (its id is persisted by the caller), belongs to the summarizer and the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from frugalstream.llm.providers.base import (
    JSON_ERRORS,
    Completion,
    ErrorKind,
    ProviderError,
    billed,
    build_timeout,
    checked_request,
    parse_json_body,
    resolve_api_key,
)
from frugalstream.llm.providers.openai import _content_text, _tool_calls, usage_from_openai
from frugalstream.schemas import TokenUsage, ToolCall

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CHAT_ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class BatchRequest:
    """One line of the input file: `custom_id` comes back on the matching output line."""

    custom_id: str
    body: Mapping[str, Any]


@dataclass(frozen=True)
class BatchStatus:
    id: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def encode_jsonl(requests: Sequence[BatchRequest], endpoint: str = CHAT_ENDPOINT) -> bytes:
    lines = [json.dumps({"custom_id": r.custom_id, "method": "POST", "url": endpoint, "body": dict(r.body)},
                        separators=(",", ":")) for r in requests]
    return ("\n".join(lines) + "\n").encode()


#: The usage of a line that reports none, from its request: (answer text, tool calls) -> estimated usage.
Estimate = Callable[[str, tuple[ToolCall, ...]], TokenUsage]


def parse_output_line(line: Mapping[str, Any], model: str, estimate: Estimate | None = None
                      ) -> Completion | ProviderError:
    """One output/error line -> a Completion or the error it reports (a failed line never raises). An answer
    without usage was billed all the same: it is estimated from its request (`estimate`), as the interactive
    path estimates, rather than refused and paid again interactively; an unusable answer carries its usage."""
    error = line.get("error")
    response = line.get("response")
    if not isinstance(response, Mapping):
        message = error.get("message", "") if isinstance(error, Mapping) else str(error or "no response")
        return ProviderError(f"batch line failed: {str(message)[:300]}", kind="server")
    status = response.get("status_code")
    body = response.get("body")
    if not isinstance(body, Mapping) or not isinstance(status, int) or status >= 400:
        detail = body.get("error", {}) if isinstance(body, Mapping) else {}
        message = detail.get("message", "") if isinstance(detail, Mapping) else ""
        kind: ErrorKind = "server" if isinstance(status, int) and status >= 500 else "client"
        return ProviderError(f"batch line HTTP {status}: {str(message)[:300]}", kind=kind, status=status)
    choices = body.get("choices")
    usage = usage_from_openai(body.get("usage"))
    prompt_only = None if estimate is None else (lambda: estimate("", ()))  # an unusable line without usage
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return billed(ProviderError("batch line has no choices", kind="malformed", status=status), usage, prompt_only)
    message = choices[0].get("message")
    content = _content_text(message.get("content")) if isinstance(message, Mapping) else ""
    reported = body.get("model")
    try:
        calls = _tool_calls(message.get("tool_calls")) if isinstance(message, Mapping) else ()
    except ProviderError as exc:
        return billed(exc, usage, prompt_only)
    if usage is None:
        if estimate is None:
            return ProviderError("batch line has no usage and no request to estimate it from", kind="malformed",
                                 status=status)
        usage = estimate(content, calls)
    return Completion(content=content, model=model, usage=usage,
                      finish_reason=str(choices[0].get("finish_reason") or "unknown"), latency_ms=0.0,
                      simulated=False, tool_calls=calls, reported_model=reported if isinstance(reported, str) else None)


class OpenAIBatchClient:
    """The four Batch API calls over one `httpx.AsyncClient`; errors become `ProviderError` like chat calls."""

    def __init__(
        self,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        api_key_file: str | None = None,
        completion_window: str = "24h",
        timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str = "openai",
    ) -> None:
        self.name = name
        self.completion_window = completion_window
        headers = {}
        if key := resolve_api_key(api_key, api_key_env, api_key_file):
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                         timeout=build_timeout(timeout_s, 5.0), transport=transport)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await checked_request(self._client, self.name, method, path, **kwargs)

    async def upload(self, content: bytes, filename: str = "batch.jsonl") -> str:
        response = await self._request("POST", "/files", data={"purpose": "batch"},
                                       files={"file": (filename, content, "application/jsonl")})
        return _string(parse_json_body(self.name, response), "id")

    async def create(self, input_file_id: str, *, endpoint: str = CHAT_ENDPOINT,
                     metadata: Mapping[str, str] | None = None) -> BatchStatus:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": endpoint,
                                "completion_window": self.completion_window}
        if metadata:
            body["metadata"] = dict(metadata)
        return _status(parse_json_body(self.name, await self._request("POST", "/batches", json=body)))

    async def submit(self, requests: Sequence[BatchRequest], *, metadata: Mapping[str, str] | None = None) -> str:
        """Upload + create; returns the batch id the caller persists before waiting."""
        file_id = await self.upload(encode_jsonl(requests))
        return (await self.create(file_id, metadata=metadata)).id

    async def get(self, batch_id: str) -> BatchStatus:
        return _status(parse_json_body(self.name, await self._request("GET", f"/batches/{batch_id}")))

    async def cancel(self, batch_id: str) -> BatchStatus:
        return _status(parse_json_body(self.name, await self._request("POST", f"/batches/{batch_id}/cancel")))

    async def find(self, key: str, value: str, *, pages: int = 5) -> str | None:
        """The newest batch whose metadata has `key: value` (the last `pages` x 100 batches are searched): how a
        batch whose id was lost in a crash between creating it and recording it is found again."""
        after: str | None = None
        for _ in range(pages):
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            payload = parse_json_body(self.name, await self._request("GET", "/batches", params=params))
            data = payload.get("data")
            items = [b for b in data if isinstance(b, Mapping)] if isinstance(data, list) else []
            for item in items:
                metadata = item.get("metadata")
                if isinstance(metadata, Mapping) and metadata.get(key) == value and isinstance(item.get("id"), str):
                    return str(item["id"])
            if not payload.get("has_more") or not items:
                return None
            after = str(items[-1].get("id"))
        return None

    async def download(self, file_id: str) -> list[dict[str, Any]]:
        response = await self._request("GET", f"/files/{file_id}/content")
        lines = []
        for raw in response.text.splitlines():
            if raw.strip():
                try:
                    value = json.loads(raw)
                except JSON_ERRORS as exc:
                    raise ProviderError("batch output line is not JSON", kind="malformed") from exc
                if isinstance(value, dict):
                    lines.append(value)
        return lines

    async def results(self, status: BatchStatus, model: str, estimates: Mapping[str, Estimate] | None = None
                      ) -> dict[str, Completion | ProviderError]:
        """Every line of the output and error files by custom_id; ids missing from both are absent. `estimates`
        by custom_id price the lines that report no usage."""
        out: dict[str, Completion | ProviderError] = {}
        for file_id in (status.error_file_id, status.output_file_id):  # output wins over an error line
            if file_id:
                for line in await self.download(file_id):
                    cid = str(line.get("custom_id"))
                    out[cid] = parse_output_line(line, model, (estimates or {}).get(cid))
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def _string(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise ProviderError(f"batch API response has no {key!r}", kind="malformed")
    return value


def _status(payload: Mapping[str, Any]) -> BatchStatus:
    def optional(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) and value else None

    return BatchStatus(id=_string(payload, "id"), status=_string(payload, "status"),
                       output_file_id=optional("output_file_id"), error_file_id=optional("error_file_id"))
