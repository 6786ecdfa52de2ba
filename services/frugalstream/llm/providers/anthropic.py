"""Adapter for Anthropic's Messages API.

Anthropic reports cache reads and cache writes *on top of* `input_tokens`, which is already the billing
shape of TokenUsage, so they map one to one. Thinking tokens are inside `output_tokens` and not reported
apart, so `reasoning_tokens` stays 0 and they are priced as output (which is how Anthropic bills them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from frugalstream.llm.prompt_cache import CachePlan
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
from frugalstream.schemas.requests import INSTRUCTION_ROLES, ToolChoice
from frugalstream.schemas.responses import MAX_TOKENS

# Anthropic stop reasons in the OpenAI vocabulary the rest of the pipeline uses ("stop" = complete answer).
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter", "pause_turn": "pause_turn"}


def _tool_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments) if call.arguments else {}
    except ValueError as exc:
        raise ProviderError(f"tool call {call.id!r} has non-JSON arguments", kind="client") from exc
    if not isinstance(value, dict):
        raise ProviderError(f"tool call {call.id!r} arguments are not a JSON object", kind="client")
    return value


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    """Content blocks for one non-system message; empty text blocks are rejected by the API, so dropped."""
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id or "", "content": message.content}]
    for part in message.parts or ():
        if part.get("type") != "text":  # image_url and friends have other shapes here: refuse, never drop
            raise ProviderError(f"content part of type {part.get('type')!r} is not supported by the anthropic "
                                "adapter", kind="client")
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    if message.role == "assistant":
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c)}
                   for c in message.tool_calls]
    return blocks


def _format_instruction(response_format: Mapping[str, Any] | None) -> str | None:
    """Messages API has no `response_format`; the JSON modes become a system instruction instead."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "Respond with a single JSON object and nothing else."
    if kind == "json_schema":
        spec = response_format.get("json_schema", {})
        schema = spec.get("schema", spec) if isinstance(spec, Mapping) else spec
        return ("Respond with a single JSON object that conforms to this JSON Schema, and nothing else:\n"
                + json.dumps(schema, separators=(",", ":"), sort_keys=True))
    return None


def _tool_to_anthropic(tool: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI `{"type": "function", "function": {...}}` tools are converted; native ones pass through."""
    fn = tool.get("function")
    if tool.get("type") == "function" and isinstance(fn, Mapping):
        if not isinstance(fn.get("name"), str):  # the caller's tool: refused, not a KeyError failing its batch
            raise ProviderError("a function tool has no name", kind="client")
        out: dict[str, Any] = {"name": fn["name"], "input_schema": fn.get("parameters") or {"type": "object"}}
        if fn.get("description"):
            out["description"] = fn["description"]
        return out
    return dict(tool)


def _tool_choice(choice: ToolChoice | None, parallel: bool | None) -> dict[str, Any] | None:
    """OpenAI's tool_choice and parallel_tool_calls in the Messages API's one `tool_choice` object."""
    if choice is None and parallel is None:
        return None
    out: dict[str, Any]
    if isinstance(choice, dict):
        out = {"type": "tool", "name": choice["function"]["name"]}
    else:
        out = {"type": {"required": "any", "none": "none"}.get(choice or "auto", "auto")}
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def build_messages_body(
    *,
    model: str,
    messages: Sequence[ChatMessage],
    sampling: SamplingParams,
    max_tokens: int,
    tools: Sequence[Mapping[str, Any]],
    response_format: Mapping[str, Any] | None,
    tool_choice: ToolChoice | None = None,
    parallel_tool_calls: bool | None = None,
    cache_plan: CachePlan | None = None,
) -> dict[str, Any]:
    """System messages are lifted into `system`; tool results become user turns; same-role turns merge. A
    `cache_plan` puts `cache_control` breakpoints after the tools, the system prompt or the leading turns."""
    system = [m.content for m in messages if m.role in INSTRUCTION_ROLES and m.content]
    if (instruction := _format_instruction(response_format)) is not None:
        system.append(instruction)
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role in INSTRUCTION_ROLES:
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:  # plain single-text turns stay strings: smaller, and what most examples use
        if len(turn["content"]) == 1 and turn["content"][0]["type"] == "text":
            turn["content"] = turn["content"][0]["text"]
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": turns}
    if system:
        body["system"] = "\n\n".join(system)
    if sampling.temperature is not None:
        body["temperature"] = min(sampling.temperature, 1.0)  # Anthropic's range is 0..1
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.stop:
        body["stop_sequences"] = list(sampling.stop)
    if tools:
        body["tools"] = [_tool_to_anthropic(t) for t in tools]
        if (choice := _tool_choice(tool_choice, parallel_tool_calls)) is not None:
            body["tool_choice"] = choice
    if cache_plan:
        place_breakpoints(body, cache_plan)
    return body  # `seed` has no Anthropic equivalent and is dropped


EPHEMERAL: dict[str, Any] = {"type": "ephemeral"}


def place_breakpoints(body: dict[str, Any], plan: CachePlan) -> None:
    """`cache_control` on the last tool, the last system block and the last block of the turn before the final
    one, as the plan asks (at most three of Anthropic's four breakpoints)."""
    if "tools" in plan.breakpoints and body.get("tools"):
        body["tools"][-1] = {**body["tools"][-1], "cache_control": EPHEMERAL}
    if "system" in plan.breakpoints and body.get("system"):
        body["system"] = [{"type": "text", "text": body["system"], "cache_control": EPHEMERAL}]
    turns = body["messages"]
    if "leading" in plan.breakpoints and len(turns) > 1:
        turn = turns[-2]
        blocks = [{"type": "text", "text": turn["content"]}] if isinstance(turn["content"], str) else turn["content"]
        turn["content"] = [*blocks[:-1], {**blocks[-1], "cache_control": EPHEMERAL}]


def usage_from_anthropic(raw: Any) -> TokenUsage | None:
    if not isinstance(raw, dict):
        return None
    inp = non_negative_int(raw.get("input_tokens"))
    out = non_negative_int(raw.get("output_tokens"))
    if inp is None or out is None:
        return None
    cache = [raw.get("cache_read_input_tokens"), raw.get("cache_creation_input_tokens")]
    read, written = (non_negative_int(v) or 0 for v in cache)
    # A cache count that cannot be true (dropping it would bill less than was spent), or input that priced
    # without the cache would not fit one usage field: the whole block is unusable, the call is estimated.
    if any(v is not None and non_negative_int(v) is None for v in cache) or inp + read + written > MAX_TOKENS:
        return None
    return TokenUsage(input_tokens=inp, cached_input_tokens=read, cache_write_tokens=written, output_tokens=out)


class AnthropicProvider:
    """Messages API over one pooled `httpx.AsyncClient`; no retries here (resilience.py owns them).

    `max_tokens` is mandatory for Anthropic, so `default_max_tokens` applies when the request sets none.
    Prompt caching is explicit here: the gateway passes a `cache_plan` (see `frugalstream.llm.prompt_cache`).
    """

    explicit_prompt_cache = True

    def __init__(
        self,
        *,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        api_key_env: str | None = "ANTHROPIC_API_KEY",
        api_key_file: str | None = None,
        anthropic_version: str = "2023-06-01",
        beta: Sequence[str] = (),
        extra_headers: Mapping[str, str] | None = None,
        default_max_tokens: int = 4096,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        token_counter: TokenCounter | None = None,
        name: str = "anthropic",
    ) -> None:
        self.name = name
        self._counter = token_counter or TokenCounter()
        self._default_max_tokens = default_max_tokens
        headers = {"content-type": "application/json", "anthropic-version": anthropic_version,
                   **(extra_headers or {})}
        if key := resolve_api_key(api_key, api_key_env, api_key_file):
            headers["x-api-key"] = key
        if beta:
            headers["anthropic-beta"] = ",".join(beta)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=build_timeout(timeout_s, connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

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
        cache_plan: CachePlan | None = None,
    ) -> Completion:
        body = self.build_body(model=model, messages=messages, sampling=sampling, max_tokens=max_tokens,
                               tools=tools, response_format=response_format, tool_choice=tool_choice,
                               parallel_tool_calls=parallel_tool_calls, cache_plan=cache_plan)
        response, latency_ms = await post_json(self._client, self.name, "/v1/messages", body)
        payload = parse_json_body(self.name, response)
        return self.parse_message(payload, model, messages, latency_ms, status=response.status_code)

    def build_body(self, *, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams,
                   max_tokens: int | None, tools: Sequence[Mapping[str, Any]],
                   response_format: Mapping[str, Any] | None, tool_choice: ToolChoice | None = None,
                   parallel_tool_calls: bool | None = None, cache_plan: CachePlan | None = None) -> dict[str, Any]:
        """The Messages API body (also one request's `params` in a Message Batch)."""
        return build_messages_body(model=model, messages=messages, sampling=sampling,
                                   max_tokens=max_tokens or self._default_max_tokens, tools=tools,
                                   response_format=response_format, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls, cache_plan=cache_plan)

    def parse_message(self, payload: Mapping[str, Any], model: str, messages: Sequence[ChatMessage],
                      latency_ms: float, *, status: int | None = None) -> Completion:
        """A Messages API response body (or a succeeded Message Batch result's `message`) as a Completion; an
        unusable one raises a `ProviderError` carrying the usage it was billed."""
        try:
            return self._answer(payload, model, messages, latency_ms, status)
        except ProviderError as exc:
            billed(exc, usage_from_anthropic(payload.get("usage")),
                   lambda: estimate_usage(self._counter, model, messages, "", ()))
            raise

    def _answer(self, payload: Mapping[str, Any], model: str, messages: Sequence[ChatMessage],
                latency_ms: float, status: int | None) -> Completion:
        if payload.get("type") == "error" and isinstance(payload.get("error"), dict):
            raise ProviderError(f"{self.name} error in body: {str(payload['error'].get('message', ''))[:300]}",
                                kind="server", status=status)
        blocks = payload.get("content")
        if not isinstance(blocks, list):
            raise ProviderError(f"{self.name} response has no content", kind="malformed", status=status)
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in blocks:
            if not isinstance(block, dict):
                raise ProviderError(f"{self.name} content block is not an object", kind="malformed")
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                calls.append(answer_tool_call(str(block.get("id", "")), str(block.get("name", "")),
                                              json.dumps(block.get("input", {}), separators=(",", ":"))))
        # The Messages API always reports usage; a proxy that strips it still gets priced, as an estimate
        # (tiktoken is not Claude's tokenizer: one more reason the result is marked `estimated`).
        usage = usage_from_anthropic(payload.get("usage")) or estimate_usage(
            self._counter, model, messages, "".join(texts), calls)
        stop = str(payload.get("stop_reason") or "unknown")
        reported = payload.get("model")
        return Completion(
            content="".join(texts),
            model=model,
            usage=usage,
            finish_reason=_FINISH.get(stop, stop),
            latency_ms=latency_ms,
            simulated=False,
            tool_calls=tuple(calls),
            reported_model=reported if isinstance(reported, str) else None,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
