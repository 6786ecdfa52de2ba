"""Adapter for any OpenAI-compatible Chat Completions endpoint (OpenAI, Azure, vLLM, Ollama, OpenRouter...).

Usage is mapped to billing terms: OpenAI reports cached reads *inside* `prompt_tokens` and reasoning tokens
*inside* `completion_tokens`, so `input_tokens = prompt - cached` and `output_tokens = completion - reasoning`
with `reasoning_tokens` carried apart. Every token then appears in exactly one field and is priced once
(reasoning at the output rate unless the catalog prices it apart). Without a `usage` block we count with
tiktoken and mark the usage `estimated`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx

from frugalstream.llm.providers.base import (
    Completion,
    ProviderError,
    answer_tool_call,
    billed,
    build_timeout,
    estimate_usage,
    non_negative_int,
    parse_json_body,
    post_json,
    resolve_api_key,
)
from frugalstream.llm.tokens import TokenCounter
from frugalstream.schemas import ChatMessage, SamplingParams, TokenUsage, ToolCall
from frugalstream.schemas.requests import ToolChoice


def message_to_openai(message: ChatMessage) -> dict[str, Any]:
    """Our ChatMessage is already OpenAI-shaped; only tool calls and optional fields need spelling out."""
    out: dict[str, Any] = {"role": message.role,
                           "content": list(message.parts) if message.parts is not None else message.content}
    if message.name:
        out["name"] = message.name
    if message.role == "assistant" and message.tool_calls:
        out["content"] = out["content"] or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id or ""
        out.pop("name", None)
    return out


def _content_text(content: Any) -> str:
    """`content` is a string, null (tool calls only), or, on some compatible servers, a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    if not isinstance(raw, list):
        return ()
    calls = []
    for item in raw:
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ProviderError("tool call without a function name", kind="malformed")
        args = fn.get("arguments", "")
        calls.append(answer_tool_call(str(item.get("id", "")), fn["name"],
                                      args if isinstance(args, str) else json.dumps(args)))
    return tuple(calls)


def usage_from_openai(raw: Any) -> TokenUsage | None:
    """Billing-term usage from an OpenAI `usage` block, or None if it is absent or unusable."""
    if not isinstance(raw, dict):
        return None
    prompt = non_negative_int(raw.get("prompt_tokens"))
    completion = non_negative_int(raw.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    prompt_details = raw.get("prompt_tokens_details")
    completion_details = raw.get("completion_tokens_details")
    cached = non_negative_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    reasoning = (non_negative_int(completion_details.get("reasoning_tokens"))
                 if isinstance(completion_details, dict) else None)
    cached = min(cached or 0, prompt)
    reasoning = min(reasoning or 0, completion)
    return TokenUsage(input_tokens=prompt - cached, cached_input_tokens=cached,
                      output_tokens=completion - reasoning, reasoning_tokens=reasoning)


class OpenAIProvider:
    """Chat Completions over one pooled `httpx.AsyncClient`; no retries here (resilience.py owns them).

    Azure: set `api_version` (sent as the `api-version` query), `auth_style="api-key"`, and
    `chat_path="/openai/deployments/{model}/chat/completions"`. `max_tokens_field="max_completion_tokens"`
    is required by OpenAI's reasoning models; most compatible servers only know `max_tokens`.
    """

    def __init__(
        self,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        api_key_file: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        api_version: str | None = None,
        auth_style: Literal["bearer", "api-key"] = "bearer",
        chat_path: str = "/chat/completions",
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        token_counter: TokenCounter | None = None,
        name: str = "openai",
    ) -> None:
        self.name = name
        self._chat_path = chat_path
        self._max_tokens_field = max_tokens_field
        self._counter = token_counter or TokenCounter()
        headers = {"content-type": "application/json", **(extra_headers or {})}
        key = resolve_api_key(api_key, api_key_env, api_key_file)
        if key:
            headers.update({"authorization": f"Bearer {key}"} if auth_style == "bearer" else {"api-key": key})
        if organization:
            headers["openai-organization"] = organization
        if project:
            headers["openai-project"] = project
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            params={"api-version": api_version} if api_version else None,
            timeout=build_timeout(timeout_s, connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    def build_body(
        self,
        *,
        model: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        max_tokens: int | None,
        tools: Sequence[Mapping[str, Any]],
        response_format: Mapping[str, Any] | None,
        tool_choice: ToolChoice | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [message_to_openai(m) for m in messages]}
        if sampling.temperature is not None:
            body["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if max_tokens is not None:
            body[self._max_tokens_field] = max_tokens
        if tools:
            body["tools"] = [dict(t) for t in tools]
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
            if parallel_tool_calls is not None:
                body["parallel_tool_calls"] = parallel_tool_calls
        if response_format is not None:
            body["response_format"] = dict(response_format)
        return body

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
    ) -> Completion:
        body = self.build_body(model=model, messages=messages, sampling=sampling, max_tokens=max_tokens,
                               tools=tools, response_format=response_format, tool_choice=tool_choice,
                               parallel_tool_calls=parallel_tool_calls)
        response, latency_ms = await post_json(self._client, self.name, self._chat_path.format(model=model), body)
        return self._parse(response, model, messages, tools, latency_ms)

    def _parse(
        self,
        response: httpx.Response,
        model: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]],
        latency_ms: float,
    ) -> Completion:
        payload = parse_json_body(self.name, response)
        try:
            return self._answer(payload, response.status_code, model, messages, tools, latency_ms)
        except ProviderError as exc:  # answered and billed, but unusable: the spend goes with the error
            billed(exc, usage_from_openai(payload.get("usage")), lambda: self.estimated(model, messages, tools, "", ()))
            raise

    def _answer(
        self,
        payload: Mapping[str, Any],
        status: int,
        model: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[Mapping[str, Any]],
        latency_ms: float,
    ) -> Completion:
        choices = payload.get("choices")
        if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
            if isinstance(payload.get("error"), dict):  # some proxies (OpenRouter) send errors with HTTP 200
                err = payload["error"]
                raise ProviderError(f"{self.name} error in body: {str(err.get('message', ''))[:300]}",
                                    kind="server", status=status)
            raise ProviderError(f"{self.name} response has no choices", kind="malformed", status=status)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise ProviderError(f"{self.name} choice has no message", kind="malformed", status=status)
        content = _content_text(message.get("content"))
        calls = _tool_calls(message.get("tool_calls"))
        usage = usage_from_openai(payload.get("usage"))
        if usage is None:
            usage = self.estimated(model, messages, tools, content, calls)
        reported = payload.get("model")
        return Completion(
            content=content,
            model=model,
            usage=usage,
            finish_reason=str(choice.get("finish_reason") or "unknown"),
            latency_ms=latency_ms,
            simulated=False,
            tool_calls=calls,
            reported_model=reported if isinstance(reported, str) else None,
        )

    def estimated(self, model: str, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]],
                  content: str, calls: Sequence[ToolCall]) -> TokenUsage:
        """The usage of an answer that reports none, counted as this adapter counts its own (`estimated`)."""
        return estimate_usage(self._counter, model, messages, content, calls, tools)

    async def aclose(self) -> None:
        await self._client.aclose()
