"""Free-form JSON a producer sends (tools, response_format, tool_choice, content parts) is bounded in depth: a
request nested just under the JSON parser's limit was accepted by the classifier, then undecodable one wrapper
deeper in dedupe, dead-lettered there and answered by nobody."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from frugalstream.runner import RunningServices
from frugalstream.schemas import LLMRequest, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas._base import MAX_JSON_DEPTH
from tests.unit.test_pipeline_inmemory import InMemoryCluster


def nested(rid: str, field: str, depth: int) -> str:
    """A request whose `field` holds `depth` nested arrays (inside what the field itself must be)."""
    deep = "[" * depth + "]" * depth
    body = {"id": rid, "tenant": "acme", "messages": [{"role": "user", "content": "what is 2+2?"}]}
    head = json.dumps(body)[:-1]
    return {
        "tools": head + ', "tools": [{"x": ' + deep + "}]}",
        "response_format": head + ', "response_format": {"x": ' + deep + "}}",
        "parts": head.replace('"content": "what is 2+2?"', '"content": [{"type": "text", "text": "hi", "x": '
                              + deep + "}]") + "}",
    }[field]


@pytest.mark.parametrize("field", ["tools", "response_format", "parts"])
def test_a_request_nested_past_the_limit_is_invalid_and_one_within_it_still_fits_every_wrapper(field: str) -> None:
    with pytest.raises(ValidationError, match="nested deeper"):
        LLMRequest.model_validate_json(nested("deep", field, MAX_JSON_DEPTH))
    ok = LLMRequest.model_validate_json(nested("ok", field, MAX_JSON_DEPTH - 4))
    assert ok.id == "ok"


async def test_a_request_nested_to_the_parsers_limit_gets_a_terminal_answer(pipeline: RunningServices) -> None:
    cluster = InMemoryCluster(pipeline)
    await pipeline.broker.start()
    await cluster.produce(t.REQUESTS, nested("deep", "tools", 198).encode(), key=b"k")
    await cluster.produce(t.REQUESTS, json.dumps({"id": "after", "tenant": "acme", "messages": [
        {"role": "user", "content": "hello"}]}).encode(), key=b"k")
    answers = await cluster.answers({"deep", "after"})
    [deep] = answers["deep"]
    assert deep.error is not None and deep.error.code == "invalid_request", deep
    assert [a.ok for a in answers["after"]] == [True]
    assert not cluster.seen.get(t.dlq_topic(t.ROUTED)), "nothing the classifier passed on is undecodable"
    routed = [RoutedRequest.model_validate_json(v) for v in cluster.seen.get(t.ROUTED, [])]
    assert [r.request.id for r in routed] == ["after"]
