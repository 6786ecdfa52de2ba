"""An API key can fix tags on every request made with it, so a tag budget binds whoever holds the key: a caller
cannot leave the tag out, and a different value it sends is refused, not silently replaced."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from frugalstream.client import FrugalClient
from frugalstream.http_entry.app import Entry, build_app
from frugalstream.http_entry.keys import ApiKeys
from frugalstream.http_entry.pricing import Pricer
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings, UsageError
from tests.unit.test_http_entry import ASK, FakePipeline, auth

KEYS = {"key-search": {"tenant": "acme", "tags": {"team": "search"}}, "key-plain": "acme"}


@pytest.fixture
async def pipeline() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
async def api(pipeline: FakePipeline) -> AsyncIterator[httpx.AsyncClient]:
    client = FrugalClient("unused", settings=Settings(), transport=pipeline)
    await client.start()
    pricer = Pricer(Settings(), PriceCatalog.load(), TokenCounter())
    app = build_app(Entry(client, ApiKeys(KEYS), pricer, lambda tenant: ["auto"]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://entry") as c:
        yield c


async def test_the_keys_tags_are_on_every_request_it_makes(api: httpx.AsyncClient, pipeline: FakePipeline) -> None:
    r = await api.post("/v1/chat/completions", json={**ASK, "metadata": {"env": "prod"}}, headers=auth("key-search"))
    assert r.status_code == 200, r.text
    r = await api.post("/v1/chat/completions", json={**ASK, "metadata": {"team": "search"}},
                       headers=auth("key-search"))
    assert r.status_code == 200, r.text  # the same value is no conflict
    r = await api.post("/v1/chat/completions", json=ASK, headers=auth("key-plain"))
    assert r.status_code == 200, r.text
    assert [dict(s.tags) for s in pipeline.sent] == [{"env": "prod", "team": "search"}, {"team": "search"}, {}]
    assert {s.tenant for s in pipeline.sent} == {"acme"}


async def test_another_value_for_a_keys_tag_is_refused_and_nothing_is_sent(api: httpx.AsyncClient,
                                                                          pipeline: FakePipeline) -> None:
    for extra in ({"metadata": {"team": "ads"}}, {"tags": {"team": "ads"}}):
        r = await api.post("/v1/chat/completions", json={**ASK, **extra}, headers=auth("key-search"))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "metadata" and "team" in r.json()["error"]["message"]
    assert pipeline.sent == []


@pytest.mark.parametrize("value", [
    {"tenant": "acme", "tags": {"team=x": "y"}},  # read as tag team = "x=y"
    {"tenant": "acme", "tags": {"team": 3}},
    {"tenant": "acme", "tags": ["team"]},
    {"tenant": "acme", "budget": 5},
    {"tags": {"team": "search"}},
])
def test_a_keys_bad_tags_or_fields_are_refused_at_start(value: object) -> None:
    with pytest.raises(UsageError, match="http_api_keys"):
        ApiKeys({"k": value})  # type: ignore[dict-item]


def test_keys_with_tags_load_from_the_settings_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    keys = ApiKeys.from_settings(Settings(http_api_keys_file=path))
    found = keys.caller("Bearer key-search")
    assert found is not None and found[0] == "acme"
    assert keys.fixed_tags(found[1]) == {"team": "search"}
    plain = keys.caller("Bearer key-plain")
    assert plain is not None and keys.fixed_tags(plain[1]) == {}
