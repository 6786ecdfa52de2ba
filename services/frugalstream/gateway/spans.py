"""The span of one model call, with the OpenTelemetry GenAI semantic-convention attributes.

One span per attempt (retries and fallbacks each get theirs), a child of the dispatched record's span, so a
trace shows which model answered, what it cost in tokens and which attempts failed. Counts and names only:
prompts and answers never go into spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry.trace import Span

from frugalstream.llm.providers import Completion
from frugalstream.runtime import tracing
from frugalstream.schemas import LLMRequest


def request_attributes(provider: str, model: str, request: LLMRequest) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.system": provider,
        "gen_ai.request.model": model, "frugalstream.tenant": request.tenant,
        "frugalstream.request_id": request.id,
    }
    sampling = request.sampling
    for name, value in (("max_tokens", request.max_tokens), ("temperature", sampling.temperature),
                        ("top_p", sampling.top_p), ("seed", sampling.seed)):
        if value is not None:
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


def response_attributes(completion: Completion) -> dict[str, Any]:
    """Input counts every prompt token (cached reads and cache writes included), output every generated one
    (reasoning included), as the conventions define them; the parts are attributes of their own."""
    usage = completion.usage
    return {
        "gen_ai.response.model": completion.reported_model or completion.model,
        "gen_ai.response.finish_reasons": [completion.finish_reason],
        "gen_ai.usage.input_tokens": usage.input_tokens + usage.cached_input_tokens + usage.cache_write_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens + usage.reasoning_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cached_input_tokens,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning_tokens,
        "frugalstream.usage.estimated": usage.estimated, "frugalstream.simulated": completion.simulated,
    }


@contextmanager
def model_call(provider: str, model: str, request: LLMRequest) -> Iterator[Span | None]:
    """`chat {model}` under the span of the record that asked; None (and no work) when tracing is off."""
    if tracing.tracer() is None:
        yield None
        return
    parent = tracing.request_context(request.tenant, request.id)
    with tracing.child_span(f"chat {model}", parent, request_attributes(provider, model, request)) as span:
        yield span


def record(span: Span | None, completion: Completion) -> None:
    if span is not None:
        span.set_attributes(response_attributes(completion))
