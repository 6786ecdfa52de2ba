"""Pipeline scenarios written once and run on both brokers, as FastStream's own tests do for its brokers.

Each scenario is an async function of a `Cluster`: every service running on some broker, seen only through
producing raw records and reading what comes out. The unit suite runs them on FastStream's in-memory broker
(`tests/unit/test_pipeline_inmemory.py`), the integration suite on the embedded Kafka-protocol broker
(`tests/integration/test_pipeline.py`), so a behaviour that only holds on one of them fails a test.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from frugalstream.accountant.app import AccountantService
from frugalstream.runner import RunningServices
from frugalstream.runtime.metrics import exposition
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, SummarizeItem, SummarizeJob
from frugalstream.schemas import topics as t
from frugalstream.tools.demo import wait_priced


class Cluster(Protocol):
    """Every service running on one broker. Topics are logical names: the cluster applies the prefix."""

    @property
    def settings(self) -> Settings: ...

    @property
    def running(self) -> RunningServices: ...

    async def produce(self, topic: str, value: bytes, *, key: bytes | None = None,
                      headers: Sequence[tuple[str, bytes]] = ()) -> None:
        """One record, acknowledged before this returns, so records produced one after another stay in order."""

    async def answers(self, want: set[str], *, quiet: bool = True) -> dict[str, list[LLMResponse]]:
        """Distinct responses per request id on `llm.responses`, from the start, until every wanted id has one.

        With `quiet`, it keeps listening for the cluster's quiet period after the last first answer, so a late
        second distinct answer (a coalesced follower answered again when its wait expired) shows up.
        """

    async def records(self, topics: Sequence[str], expected: int) -> list[bytes]:
        """Every value on these topics, from the start: until `expected` are in, then for a short quiet period,
        so one too many shows up."""

    async def settle(self) -> None:
        """Gives in-flight work (ledger writes, offset commits) the time to land."""


Scenario = Callable[[Cluster], Awaitable[None]]


def today() -> str:
    """The current UTC day, as a budget state's `period_start` (a state of an ended period says nothing)."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def ask(i: int, text: str, tenant: str = "acme", **kw: Any) -> LLMRequest:
    return LLMRequest(id=f"q{i}", tenant=tenant, messages=(ChatMessage(role="user", content=text),), **kw)


async def send(cluster: Cluster, *requests: LLMRequest) -> None:
    """Requests on `llm.requests` as a client sends them: stamped now, keyed by their id, in order."""
    for req in requests:
        stamped = req.model_copy(update={"created_at": time.time()})
        await cluster.produce(t.REQUESTS, stamped.model_dump_json().encode(), key=req.id.encode())


def accountant_of(cluster: Cluster) -> AccountantService:
    accountant = cluster.running.service("accountant")
    assert isinstance(accountant, AccountantService)
    return accountant


FAQ = ("What are your business hours?", "How do I reset my password?", "Where is my card?")


def mixed_workload() -> list[LLMRequest]:
    """Three FAQs repeated, a reasoning and a code question, a long history, another tenant, no-store, and a
    repeat that only matches after normalization (case, spacing, trailing punctuation)."""
    reqs: list[LLMRequest] = []
    for i in range(30):
        reqs.append(ask(len(reqs), FAQ[i % 3]))
    reqs.append(ask(len(reqs), "Prove that there are infinitely many primes, step by step."))
    reqs.append(ask(len(reqs), "Write a Python function that parses ISO dates."))
    history = (
        *(ChatMessage(role="user" if k % 2 == 0 else "assistant", content=f"turn {k} " + "words " * 400)
          for k in range(12)),
        ChatMessage(role="user", content="And what about my last statement?"),
    )
    reqs.append(LLMRequest(id=f"q{len(reqs)}", tenant="globex", messages=history))
    reqs.append(ask(len(reqs), "What are your business hours?", tenant="globex"))
    reqs.append(ask(len(reqs), "What are your business hours?", cache={"policy": "no-store"}))
    reqs.append(ask(len(reqs), "what are your  business hours"))
    return reqs


async def repeats_hit_the_cache_and_costs_reconcile(cluster: Cluster) -> None:
    """One answer per request; repeats come from the exact cache; costs add up in the ledger and the events."""
    requests = mixed_workload()
    # First occurrences go first, so the repeats can only be served by the cache or coalescing.
    await send(cluster, *requests[:3])
    first = await cluster.answers({r.id for r in requests[:3]}, quiet=False)
    await send(cluster, *requests[3:])
    got = await cluster.answers({r.id for r in requests})
    accountant = accountant_of(cluster)
    billable = sum(1 for rs in got.values() if rs[0].source != "error")
    await wait_priced(accountant, billable, 30)
    await cluster.settle()
    totals = accountant.ledger.totals()

    assert len(first) == 3
    assert set(got) == {r.id for r in requests}
    assert all(len(rs) == 1 for rs in got.values()), "exactly one distinct terminal message per request: " + str(
        {k: [r.source for r in rs] for k, rs in got.items() if len(rs) > 1})
    by_id = {k: rs[0] for k, rs in got.items()}
    assert all(r.error is None for r in by_id.values())
    assert [by_id[f"q{i}"].source for i in range(3)] == ["llm"] * 3
    for i in range(3, 30):
        assert (by_id[f"q{i}"].source, by_id[f"q{i}"].served_from) == ("cache_exact", f"q{i % 3}")
    assert by_id["q33"].source == "llm", "another tenant's identical question is never served from acme's cache"
    assert by_id["q34"].source == "llm", "no-store skips the cache"
    assert by_id["q32"].source == "llm"
    assert (by_id["q35"].source, by_id["q35"].served_from) == ("cache_exact", "q0"), "normalized repeat"

    events = {e["id"]: e for e in map(json.loads, await cluster.records([t.COST_EVENTS], billable))}
    assert len(events) == billable
    baseline = sum(e["data"]["baseline_cost_usd"] for e in events.values())
    actual = sum(e["data"]["actual_cost_usd"] for e in events.values())
    assert abs(baseline - totals["baseline_cost_usd"]) < 1e-9
    assert abs(actual - totals["actual_cost_usd"]) < 1e-9
    assert totals["baseline_cost_usd"] > totals["actual_cost_usd"] > 0
    assert abs(totals["baseline_cost_usd"] - totals["actual_cost_usd"] - sum(totals["by_strategy"].values())) < 1e-9
    assert totals["by_strategy"]["cache_exact"] > 0
    assert totals["by_strategy"]["context_trim"] > 0


#: Every topic a service consumes with a group (compacted state topics are read whole, without one).
INPUT_TOPICS = (t.REQUESTS, t.ROUTED, t.DISPATCH, t.RESPONSES, t.USAGE, t.SUMMARIZE_JOBS)
NOT_A_CONTRACT = b'{"not": "a contract"}'
WRONG_TYPES = b'{"id": 1, "tenant": "x"}'
NOT_UTF8 = b"\xff\xfe\x00"


async def malformed_messages_are_dead_lettered_and_the_partition_keeps_flowing(cluster: Cluster) -> None:
    """A bad record on every input topic lands on its DLQ, raw bytes and key kept, and the valid records after it
    on the same key (so the same partition) are still answered: exactly once, and nothing else is."""
    settings = cluster.settings
    for topic in INPUT_TOPICS:
        await cluster.produce(topic, NOT_A_CONTRACT, key=b"k1", headers=[("origin", b"fuzz")])
    await cluster.produce(t.REQUESTS, WRONG_TYPES, key=b"k1")
    await cluster.produce(t.REQUESTS, NOT_UTF8, key=b"k1")
    await cluster.produce(t.REQUESTS, ask(1, "Hi there").model_dump_json().encode(), key=b"k1")
    job = SummarizeJob(job_id="j1", tenant="acme", instruction="Summarize in one line.",
                       items=(SummarizeItem(id="a", text="A red bicycle with two wheels."),))
    await cluster.produce(t.SUMMARIZE_JOBS, job.model_dump_json().encode(), key=b"k1")

    got = await cluster.answers({"q1"})
    letters = [json.loads(v) for v in await cluster.records([t.dlq_topic(x) for x in INPUT_TOPICS], 8)]
    summaries = [json.loads(v) for v in await cluster.records([t.SUMMARIES], 1)]

    assert list(got) == ["q1"] and len(got["q1"]) == 1, "the valid request, and only it, is answered once"
    assert got["q1"][0].source == "llm"
    assert [s["item_id"] for s in summaries] == ["a"]
    assert sorted(letter["topic"] for letter in letters) == sorted(
        [settings.topic(x) for x in INPUT_TOPICS] + [settings.topic(t.REQUESTS)] * 2)
    for letter in letters:
        assert letter["error"] and letter["error_type"] in {"ValidationError", "ValueError"}
        assert base64.b64decode(letter["value_b64"]) in {NOT_A_CONTRACT, WRONG_TYPES, NOT_UTF8}
        assert letter["key_b64"] == base64.b64encode(b"k1").decode()
    wrong_types = [x for x in letters if base64.b64decode(x["value_b64"]) == WRONG_TYPES]
    assert [(x["topic"], x["error_type"]) for x in wrong_types] == [(settings.topic(t.REQUESTS), "ValidationError")]


async def published_outputs_feed_the_prometheus_series(cluster: Cluster) -> None:
    """Responses, routing decisions, savings and stage latencies reach the exposition the scraper reads."""
    metrics = cluster.running.publisher.metrics
    before = metrics.responses.labels("cache_exact")._value.get()
    leader, repeat = (ask(100 + i, "Is the branch open on Sunday?", tenant="metrics") for i in range(2))
    await send(cluster, leader)
    await cluster.answers({leader.id}, quiet=False)  # answered first, so the repeat is a cache hit, not coalesced
    await send(cluster, repeat)
    got = await cluster.answers({leader.id, repeat.id})
    await wait_priced(accountant_of(cluster), 2, 30)
    await cluster.settle()

    assert [rs[0].source for rs in (got[leader.id], got[repeat.id])] == ["llm", "cache_exact"]
    assert metrics.responses.labels("cache_exact")._value.get() == before + 1
    text = exposition(metrics)
    assert 'frugal_routing_decisions_total{task_type="faq",tier="small"}' in text
    assert 'frugal_saved_usd_total{strategy="cache_exact",tenant="metrics"}' in text
    assert "frugal_stage_latency_seconds_bucket" in text


SCENARIOS: tuple[Scenario, ...] = (
    repeats_hit_the_cache_and_costs_reconcile,
    malformed_messages_are_dead_lettered_and_the_partition_keeps_flowing,
    published_outputs_feed_the_prometheus_series,
)
