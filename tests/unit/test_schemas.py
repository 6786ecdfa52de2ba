"""The checked-in JSON Schema files are generated from the pydantic models and must not drift."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from frugalstream.schemas import LLMRequest
from frugalstream.schemas.generate import JSON_DIR, render
from frugalstream.schemas.topics import ALL_TOPICS, CONTRACTS_BY_NAME, TOPIC_CONTRACTS


def test_checked_in_json_schemas_match_the_models() -> None:
    rendered = render()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.schema.json")}
    assert set(on_disk) == set(rendered), "run `python -m frugalstream.schemas.generate`"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} drifted from its model: run `python -m frugalstream.schemas.generate`"


def test_every_contract_is_versioned_and_every_topic_has_a_dlq() -> None:
    for name, model in CONTRACTS_BY_NAME.items():
        schema = model.model_json_schema()
        assert "schema_version" in schema["properties"] or name == "CostEvent", name
    for topic in TOPIC_CONTRACTS:
        assert f"{topic}.dlq" in ALL_TOPICS
    assert json.loads((JSON_DIR / "CostEvent.schema.json").read_text())["properties"]["specversion"]["const"] == "1.0"


@pytest.mark.parametrize("payload", [
    {"id": "a", "tenant": "t", "messages": []},
    {"id": "a", "tenant": "t", "messages": [{"role": "user", "content": "x"}], "schema_version": 2},
    {"id": "a", "tenant": "t", "messages": [{"role": "wizard", "content": "x"}]},
    {"id": "a", "tenant": "t", "messages": [{"role": "user", "content": "x"}], "surprise": 1},
    {"id": "a", "tenant": "t", "messages": [{"role": "user", "content": "x"}], "reply_topic": "bad topic!"},
    {"id": "a", "tenant": "t", "messages": [{"role": "user", "content": "x"}], "cache": {"policy": "forever"}},
])
def test_request_contract_rejects_bad_input(payload: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LLMRequest.model_validate(payload)
