"""Anthropic Message Batches: create a batch of Messages API requests, poll it, read its JSONL results, cancel.

Half the standard price, results within 24 h; prompt caching (cache_control breakpoints) applies inside a
batch as well, and the discounts stack. Message Batches keep no metadata, so a batch whose id was lost in a
crash between creating and recording it cannot be found again (`find` returns None; see the gateway's
`batch_runner` for what that means).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from frugalstream.llm.providers.anthropic import AnthropicProvider
from frugalstream.llm.providers.base import (
    JSON_ERRORS,
    Completion,
    ProviderError,
    build_timeout,
    checked_request,
    parse_json_body,
    resolve_api_key,
)
from frugalstream.llm.providers.batch_api import BatchCall, BatchPoll


def parse_result_line(line: Mapping[str, Any], chat: AnthropicProvider, model: str,
                      messages: Sequence[Any] = ()) -> Completion | ProviderError:
    """One results line -> a Completion or the error it reports (errored, canceled, expired never raise)."""
    result = line.get("result")
    if not isinstance(result, Mapping):
        return ProviderError("batch result line has no result", kind="malformed")
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), Mapping):
        try:
            return chat.parse_message(result["message"], model, messages, 0.0)
        except ProviderError as exc:
            return exc
    if kind == "errored":
        error = result.get("error")
        detail = error.get("error", error) if isinstance(error, Mapping) else {}
        message = detail.get("message", "") if isinstance(detail, Mapping) else ""
        etype = str(detail.get("type", "")) if isinstance(detail, Mapping) else ""
        server = etype in ("api_error", "overloaded_error")
        return ProviderError(f"batch request errored: {etype} {str(message)[:300]}".rstrip(),
                             kind="server" if server else "client")
    return ProviderError(f"batch request {kind or 'unknown'}", kind="server")  # canceled / expired: try again


class AnthropicBatchJobs:
    simulated = False
    can_find = False  # see `find`
    explicit_prompt_cache = True  # cache_control breakpoints apply inside a batch too

    def __init__(self, chat: AnthropicProvider, *, base_url: str = "https://api.anthropic.com",
                 api_key: str | None = None, api_key_env: str | None = "ANTHROPIC_API_KEY",
                 api_key_file: str | None = None, anthropic_version: str = "2023-06-01", timeout_s: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None, name: str = "anthropic") -> None:
        self.name = name
        self.chat = chat
        headers = {"content-type": "application/json", "anthropic-version": anthropic_version}
        if key := resolve_api_key(api_key, api_key_env, api_key_file):
            headers["x-api-key"] = key
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                         timeout=build_timeout(timeout_s, 5.0), transport=transport)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await checked_request(self._client, self.name, method, path, **kwargs)

    def _line(self, call: BatchCall) -> dict[str, Any] | None:
        """One request of the batch; None for one whose body cannot be built (a caller's tool call with non-JSON
        arguments): it is left out, so its member reads as missing and is answered interactively (its error),
        and one tenant's request cannot get the whole job, other tenants' too, refused."""
        try:
            return {"custom_id": call.custom_id, "params": self.chat.build_body(
                model=call.model, messages=call.messages, sampling=call.sampling, max_tokens=call.max_tokens,
                tools=call.tools, response_format=call.response_format, tool_choice=call.tool_choice,
                parallel_tool_calls=call.parallel_tool_calls, cache_plan=call.cache_plan)}
        except ProviderError as exc:
            if exc.retryable:
                raise
            return None

    async def submit(self, job_id: str, model: str, calls: Sequence[BatchCall]) -> str:
        requests = [line for c in calls if (line := self._line(c)) is not None]
        if not requests:
            raise ProviderError("no request of the batch can be sent", kind="client")
        payload = parse_json_body(self.name, await self._request("POST", "/v1/messages/batches",
                                                                 json={"requests": requests}))
        batch_id = payload.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise ProviderError("message batch response has no id", kind="malformed")
        return batch_id

    async def find(self, job_id: str) -> str | None:
        return None  # Message Batches carry no metadata to find a job by

    async def poll(self, batch_id: str, model: str, calls: Sequence[BatchCall] = ()) -> BatchPoll:
        status = parse_json_body(self.name, await self._request("GET", f"/v1/messages/batches/{batch_id}"))
        state = str(status.get("processing_status", ""))
        if state != "ended":
            return BatchPoll(False, status=state)
        # The results path on the configured base URL (the body's results_url names the public host).
        response = await self._request("GET", f"/v1/messages/batches/{batch_id}/results")
        results: dict[str, Completion | ProviderError] = {}
        messages = {c.custom_id: c.messages for c in calls}  # a line without usage is estimated from them
        for raw in response.text.splitlines():
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except JSON_ERRORS as exc:
                raise ProviderError("message batch result line is not JSON", kind="malformed") from exc
            if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                cid = line["custom_id"]
                results[cid] = parse_result_line(line, self.chat, model, messages.get(cid, ()))
        return BatchPoll(True, results, state)

    async def cancel(self, batch_id: str) -> None:
        await self._request("POST", f"/v1/messages/batches/{batch_id}/cancel")

    async def aclose(self) -> None:
        await self._client.aclose()
