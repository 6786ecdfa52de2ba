"""Contracts of `llm.requests`, `llm.requests.routed` and `llm.requests.dispatch`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from frugalstream.schemas._base import MAX_JSON_DEPTH, Contract, nested_deeper_than

TaskType = Literal[
    "faq", "extraction", "classification", "summarization", "drafting",
    "code", "reasoning", "creative", "chat",
]
TASK_TYPES: tuple[TaskType, ...] = (
    "faq", "extraction", "classification", "summarization", "drafting",
    "code", "reasoning", "creative", "chat",
)
Tier = Literal["small", "mid", "large"]
TIERS: tuple[Tier, ...] = ("small", "mid", "large")
CachePolicy = Literal["default", "no-store", "no-cache"]
#: How long the producer can wait for the answer: anything but `interactive` may go through a provider's batch
#: API at its batch price (`within_1h`: answered within an hour of `created_at`, `within_24h`: within a day).
LatencyClass = Literal["interactive", "within_1h", "within_24h"]


Role = Literal["system", "developer", "user", "assistant", "tool"]
#: Roles whose turns instruct the model: kept whole by trimming, never a conversation turn to drop.
INSTRUCTION_ROLES: tuple[Role, ...] = ("system", "developer")
ToolChoice = Literal["none", "auto", "required"] | dict[str, Any]


class ToolCall(BaseModel):
    """Flat (`id`, `name`, `arguments`); OpenAI's nested `{"type": "function", "function": {...}}` is accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    arguments: str = Field(default="", description="JSON-encoded arguments, as the provider sent them.")

    @model_validator(mode="before")
    @classmethod
    def _openai_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and "function" in data:
            if data.get("type", "function") != "function":
                raise ValueError(f"tool_calls[].type {data.get('type')!r} is not supported (only 'function')")
            fn = data["function"]
            if not isinstance(fn, dict):
                raise ValueError("tool_calls[].function must be an object with name and arguments")
            return {"id": data.get("id", ""), "name": fn.get("name"), "arguments": fn.get("arguments", "")}
        return data


def _text_of(parts: tuple[dict[str, Any], ...]) -> str:
    return "\n".join(p["text"] for p in parts if p.get("type") == "text")


class ChatMessage(BaseModel):
    """One chat turn in the OpenAI-style format every provider adapter maps from.

    `content` is always the turn's text. A turn sent as content parts (OpenAI's list form) keeps them in
    `parts`, untouched, for the provider; `content` is then their text parts joined, recomputed on every
    validation so the text that routing and cache keys read is always the text the model gets. A turn
    with a non-text part (image, audio, file) is `opaque`: its text does not say what is asked, so the
    classifier marks the request uncacheable.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = ""
    name: str | None = Field(default=None, max_length=256)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = Field(default=None, max_length=256)
    parts: tuple[dict[str, Any], ...] | None = Field(
        default=None, max_length=256, description="Content parts as sent (OpenAI list form), passed to the "
                                                  "provider untouched; `content` holds their text.")

    @model_validator(mode="before")
    @classmethod
    def _openai_content(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        content = data.get("content")
        if content is None and "content" in data:
            if data.get("role") != "assistant":
                raise ValueError("messages[].content may be null only on an assistant turn (with tool_calls)")
            data["content"] = ""
        elif isinstance(content, list):
            if data.get("parts") is not None:
                raise ValueError("give content parts either as a list in content or in parts, not both")
            data["parts"] = content
        parts = data.get("parts")
        if parts is not None:
            for part in parts if isinstance(parts, list | tuple) else ():
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError("messages[].content parts must be objects with a string 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise ValueError("messages[].content text parts need a string 'text'")
            data["content"] = _text_of(tuple(parts)) if isinstance(parts, list | tuple) else ""
        return data

    @field_validator("parts")
    @classmethod
    def _parts_not_too_deep(cls, parts: tuple[dict[str, Any], ...] | None) -> tuple[dict[str, Any], ...] | None:
        if nested_deeper_than(parts):
            raise ValueError(f"messages[].content parts nested deeper than {MAX_JSON_DEPTH} levels")
        return parts

    @property
    def opaque(self) -> bool:
        """Carries a part (image, audio, file...) whose meaning is not in `content`."""
        return self.parts is not None and any(p.get("type") != "text" for p in self.parts)


class SamplingParams(BaseModel):
    """Parameters that change the answer, and therefore belong to the cache scope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, stop: Any) -> Any:
        """OpenAI accepts one string, a list, or null."""
        return () if stop is None else (stop,) if isinstance(stop, str) else stop


class CacheControl(BaseModel):
    """`no-cache` skips lookup but stores the answer; `no-store` neither reads nor writes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: CachePolicy = "default"
    ttl_s: int | None = Field(default=None, gt=0, description="Upper bound on the age of a served answer.")
    shared_scope: str | None = Field(
        default=None, max_length=128,
        description="Scope shared between tenants; the tenant's policy must grant it (read and/or write).",
    )


_SAMPLING_FIELDS = tuple(SamplingParams.model_fields)


def checked_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags`, or ValueError. Budgets and the ledger name a tag `key=value`, split at the first '=': a key holding
    '=' would be charged under another tag (`{"env=prod": "eu"}` read as env = "prod=eu"). The HTTP entry holds
    an API key's fixed tags to the same rules."""
    if len(tags) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in tags.items()):
        raise ValueError("at most 32 tags, keys <= 64 and values <= 256 characters")
    if bad := sorted(k for k in tags if "=" in k):
        raise ValueError(f"tag keys may not contain '=' (a tag is named key=value): {bad}")
    return tags


class LLMRequest(Contract):
    """A job an application produces to `llm.requests`."""

    schema_version: Literal[1] = 1
    id: str = Field(min_length=1, max_length=128, description="Idempotency key: redelivery never pays twice.")
    tenant: str = Field(min_length=1, max_length=128)
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    model: str | None = Field(
        default=None, max_length=128, description="Pinned model; honoured unless policy forbids it."
    )
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = Field(default=None, gt=0, le=200_000)
    cache: CacheControl = CacheControl()
    task_hint: TaskType | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: ToolChoice | None = Field(
        default=None, description="OpenAI's tool_choice: none, auto, required, or {type: function, function: {name}}.")
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    tags: dict[str, str] = Field(
        default_factory=dict, description="Attribution labels (budgets and reports by `key=value`): at most 32, "
                                          "keys <= 64 characters without '=', values <= 256 characters.")
    reply_topic: str | None = Field(
        default=None, max_length=249, pattern=r"^[A-Za-z0-9._-]+$",
        description="Also publish the answer here. Granted by the tenant's policy (by default only topics under "
                    "`<tenant>.`), never a frugalstream topic or a DLQ.",
    )
    created_at: float | None = Field(default=None, allow_inf_nan=False,
                                     description="Producer's unix time, for end-to-end latency.")
    latency_class: LatencyClass = Field(
        default="interactive", description="How long the producer can wait: `within_1h` / `within_24h` requests "
                                           "may be answered through a provider batch API at half price.")
    deadline: float | None = Field(
        default=None, allow_inf_nan=False,
        description="Unix time by which the answer is needed (tighter than the latency class when both are set); a "
                    "request that can wait past now is deferrable.")

    @model_validator(mode="before")
    @classmethod
    def _openai_top_level(cls, data: Any) -> Any:
        """OpenAI's spelling: top-level sampling fields, `max_completion_tokens`, `n`; a clash names the field.

        Runs before any type check, so it must not assume `sampling` is an object: `dict(5)` raises a bare
        `TypeError` (not a validation error: it escapes the stage's decoding) and `dict([["seed", 1]])` or a
        falsy `0` merged with top-level fields would pass as sampling. Anything but an object (or null, or a
        `SamplingParams` given in Python) is refused with a `ValueError`, which pydantic reports as invalid.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        n = data.pop("n", None)
        if n is not None and n != 1:
            raise ValueError(f"n={n!r} is not supported: one answer per request (send n=1 or leave it out)")
        given = data.get("sampling")
        if given is not None and not isinstance(given, dict | SamplingParams):
            # The type's name, never the value: it may be anything the producer sent (prompt text, say).
            raise ValueError(f"sampling must be an object (temperature, top_p, seed, stop), "
                             f"not {type(given).__name__}")
        sampling = dict(given or {})
        for name in _SAMPLING_FIELDS:
            if name not in data:
                continue
            value = data.pop(name)
            if value is None:
                continue
            if sampling.get(name) not in (None, value):
                raise ValueError(f"{name} is given both top-level and in sampling, with different values")
            sampling[name] = value
        if sampling:
            data["sampling"] = sampling
        completion = data.pop("max_completion_tokens", None)
        if completion is not None:
            if data.get("max_tokens") not in (None, completion):
                raise ValueError("max_tokens and max_completion_tokens are both given, with different values")
            data["max_tokens"] = completion
        return data

    @field_validator("tools", "response_format", "tool_choice")
    @classmethod
    def _not_too_deep(cls, value: Any) -> Any:
        if nested_deeper_than(value):
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _function_choice(cls, choice: ToolChoice | None) -> ToolChoice | None:
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}")
        return choice

    @property
    def opaque(self) -> bool:
        """A turn carries a non-text part: the text alone does not identify the request, so it is not cached."""
        return any(m.opaque for m in self.messages)

    @field_validator("reply_topic")
    @classmethod
    def _kafka_topic_name(cls, topic: str | None) -> str | None:
        if topic in (".", ".."):
            raise ValueError("'.' and '..' are not Kafka topic names")
        return topic

    @field_validator("tags")
    @classmethod
    def _bounded_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        return checked_tags(tags)


class Route(BaseModel):
    """What the classifier decided, carried with the request to every later stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_type: TaskType
    tier: Tier
    model: str
    provider: str
    fallbacks: tuple[str, ...] = ()
    escalation_score: float | None = None
    reason: str = Field(description="Why this tier: rule or score, for operators, never prompt text.")
    input_tokens: int = Field(ge=0, description="Tokens sent after trimming.")
    full_input_tokens: int = Field(ge=0, description="Tokens of the untrimmed request (the baseline's context).")
    trimmed_messages: int = Field(default=0, ge=0)
    baseline_model: str
    pinned: bool = False
    downgraded_by_budget: bool = False
    refused_by_budget: str | None = Field(
        default=None, max_length=500,
        description="Why spend is refused (an exhausted `refuse` budget): only an answer that costs nothing, from "
                    "the cache or an in-flight twin, may serve the request; dedupe answers `budget_exceeded` "
                    "otherwise, and the gateway never calls a model for it.")


class CacheKeys(BaseModel):
    """Keys the dedupe stage uses; also echoed on the response so the cache fills itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scope: str = Field(description="Hash of everything that must match exactly (tenant, tier, system prompt...).")
    exact: str = Field(description="Hash of the normalized conversation within the scope.")
    prefix: str = Field(description="Hash of all turns before the last user turn: multi-turn must match exactly.")
    lookup_text: str = Field(description="The last user turn, whitespace-normalized: what the semantic index embeds.")
    tier_rank: int = Field(ge=0, description="A cached answer may serve the same or a lower tier.")
    lookup_truncated: bool = Field(
        default=False, exclude_if=lambda v: not v,
        description="`lookup_text` is the start of a longer turn: such a request is never a semantic hit and its "
                    "answer never a semantic candidate (exact hits are unaffected).")


class RoutedRequest(Contract):
    """`llm.requests.routed` and `llm.requests.dispatch`: the request with its route and cache keys."""

    schema_version: Literal[1] = 1
    request: LLMRequest
    route: Route
    keys: CacheKeys
    routed_at: float
    embedding: str | None = Field(
        default=None, description="base64 float16 embedding of lookup_text, computed once by the classifier."
    )
    coalesced_with: tuple[str, ...] = Field(
        default=(), description="Request ids that wait for this dispatch's answer (in-flight coalescing)."
    )
    audit_messages: tuple[ChatMessage, ...] | None = Field(
        default=None, description="The untrimmed messages, carried only when the request was trimmed and its "
                                  "saving is sampled for audit: the counterfactual call runs on the full context."
    )
