"""The bundled demo workload: valid, shaped as documented, and safe for every stage that will see it."""

from __future__ import annotations

import gzip
import itertools
import json
import re
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

import pytest

from frugalstream.llm.cache_keys import normalize_text
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest
from frugalstream.tools.demo_workload import (
    ARRIVAL_TAG,
    DATA_PACKAGE,
    MIX_RANGES,
    WORKLOAD_FILE,
    WORKLOAD_TAG,
    WORKLOADS,
    arrival_offsets_s,
    load_demo_workload,
    workload_mix,
)

ROOT = Path(__file__).resolve().parents[2]
MAX_MESSAGE_BYTES = Settings.model_fields["max_message_bytes"].default
ALLOWED_SOURCES = {"banking77", "clinc150", "mt_bench", "arena_hard", "routellm_eval",
                   "azure_llm_inference_trace_2023", "mooncake_traces"}


@pytest.fixture(scope="module")
def workload() -> list[LLMRequest]:
    return load_demo_workload()


@pytest.fixture(scope="module")
def raw_lines() -> list[str]:
    blob = resources.files(DATA_PACKAGE).joinpath(WORKLOAD_FILE).read_bytes()
    return [line for line in gzip.decompress(blob).decode("utf-8").splitlines() if line.strip()]


def test_loads_every_row_as_a_valid_request(workload: list[LLMRequest], raw_lines: list[str]) -> None:
    assert 600 <= len(workload) <= 800
    assert len(raw_lines) == len(workload)
    for line, request in zip(raw_lines, workload, strict=True):
        assert LLMRequest.model_validate(json.loads(line)) == request
        assert request.created_at is None


def test_shipped_file_is_small() -> None:
    assert len(resources.files(DATA_PACKAGE).joinpath(WORKLOAD_FILE).read_bytes()) < 400_000


def test_ids_are_unique_and_stable(workload: list[LLMRequest]) -> None:
    ids = [r.id for r in workload]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"demo-\d{6}", i) for i in ids)


def test_mix_is_within_the_documented_ranges(workload: list[LLMRequest]) -> None:
    mix = workload_mix(workload)
    assert set(mix) == set(WORKLOADS)
    assert sum(mix.values()) == len(workload)
    for name, (lo, hi) in MIX_RANGES.items():
        assert lo <= mix[name] / len(workload) <= hi, (name, mix[name])


def test_documented_mix_matches_the_file(workload: list[LLMRequest]) -> None:
    doc = resources.files(DATA_PACKAGE).joinpath("DEMO_WORKLOAD.md").read_text(encoding="utf-8")
    for name, count in workload_mix(workload).items():
        assert re.search(rf"^\| {name} \| {count} \|", doc, re.MULTILINE), name
    for licence in ("CC BY 4.0", "CC BY 3.0", "Apache-2.0", "MIT"):
        assert licence in doc


def test_no_message_exceeds_the_max_message_size(workload: list[LLMRequest], raw_lines: list[str]) -> None:
    assert max(len(line.encode()) for line in raw_lines) < MAX_MESSAGE_BYTES
    assert max(len(m.content.encode()) for r in workload for m in r.messages) < MAX_MESSAGE_BYTES


def _tool_pairs_intact(request: LLMRequest) -> bool:
    """Every tool call is answered right after its assistant turn, and every result answers such a call."""
    pending: set[str] = set()
    for message in request.messages:
        if message.role == "tool":
            if message.tool_call_id not in pending:
                return False
            pending.discard(message.tool_call_id)
        else:
            if pending:
                return False
            pending = {call.id for call in message.tool_calls}
    return not pending


def test_long_histories_have_realistic_length_and_intact_tool_pairs(workload: list[LLMRequest]) -> None:
    longs = [r for r in workload if r.tags[WORKLOAD_TAG] == "long_history"]
    for r in longs:
        assert 8 <= sum(1 for m in r.messages if m.role != "system") <= 30, r.id
        assert r.messages[-1].role == "user"
    assert all(_tool_pairs_intact(r) for r in workload)
    with_tools = [r for r in longs if any(m.tool_calls for m in r.messages)]
    assert len(with_tools) >= 2
    assert any(len(m.tool_calls) >= 2 for r in with_tools for m in r.messages)  # parallel calls too
    for r in with_tools:
        declared = {t["function"]["name"] for t in r.tools}
        assert {c.name for m in r.messages for c in m.tool_calls} <= declared, r.id


def test_long_histories_give_the_context_budget_something_to_trim(workload: list[LLMRequest]) -> None:
    budget = Settings().context_budgets["chat"]
    counter = TokenCounter()
    longs = [r for r in workload if r.tags[WORKLOAD_TAG] == "long_history"]
    over = sum(counter.count_messages(r.messages, "gpt-4o") > budget for r in longs)
    assert over >= len(longs) // 2


def test_faq_traffic_repeats_like_production_not_like_a_showcase(workload: list[LLMRequest]) -> None:
    faq = [r for r in workload if r.tags[WORKLOAD_TAG] == "faq"]
    by_tenant: dict[str, list[LLMRequest]] = defaultdict(list)
    for r in faq:
        by_tenant[r.tenant].append(r)
    assert len(by_tenant) >= 2
    for tenant, requests in by_tenant.items():
        assert len({r.messages[0].content for r in requests}) == 1, tenant  # one system prompt per tenant
        assert {r.sampling.temperature for r in requests} == {0.0}, tenant
    texts = Counter((r.tenant, normalize_text(r.messages[-1].content)) for r in faq)
    repeats = sum(c - 1 for c in texts.values())
    assert 0.05 <= repeats / len(faq) <= 0.35  # some exact repeats, most traffic is not
    assert max(texts.values()) >= 4  # a Zipf head exists
    raw = {(r.tenant, r.messages[-1].content) for r in faq}
    assert len(raw) > len(texts)  # some repeats are typed differently (case, spacing, punctuation)


def test_cache_policies_pins_and_hints_are_present_but_rare(workload: list[LLMRequest]) -> None:
    policies = Counter(r.cache.policy for r in workload)
    assert policies["no-store"] >= 1 and policies["no-cache"] >= 1
    assert policies["default"] / len(workload) > 0.9
    pinned = [r for r in workload if r.model is not None]
    assert all(r.tags[WORKLOAD_TAG] == "pinned" for r in pinned)
    assert {r.model for r in pinned} <= {"gpt-4o", "gpt-4o-mini"}
    jobs = [r for r in workload if r.tags[WORKLOAD_TAG] in ("routine", "hard")]
    assert 0.1 <= sum(r.task_hint is not None for r in jobs) / len(jobs) <= 0.3
    assert all(r.task_hint is None for r in workload if r.tags[WORKLOAD_TAG] == "faq")


def test_arrival_offsets_follow_the_file_order_and_rescale(workload: list[LLMRequest]) -> None:
    offsets = arrival_offsets_s(workload)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert all(ARRIVAL_TAG in r.tags for r in workload)
    scaled = arrival_offsets_s(workload, duration_s=60.0)
    assert scaled[-1] == pytest.approx(60.0)


def test_workload_mix_counts_untagged_requests() -> None:
    assert workload_mix([]) == {}
    request = LLMRequest(id="x", tenant="t", messages=(ChatMessage(role="user", content="hi"),))
    assert workload_mix([request]) == {"untagged": 1}


def test_builder_reads_only_redistributable_sources() -> None:
    source = (ROOT / "scripts" / "build_demo_workload.py").read_text(encoding="utf-8")
    folders = set(re.findall(r'data / "([\w-]+)"', source))
    assert folders and folders <= ALLOWED_SOURCES, folders - ALLOWED_SOURCES
