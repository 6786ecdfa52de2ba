"""Round 4 of the hostile review: dedupe's cache (llm.cache and its rebuild) and the accountant's ledger.

A malformed carried embedding no longer fails a partition's rebuild; a rebuilt entry lives by the TTL its task has
now; a real provider's cache never holds the simulator's answers; a usage id seen again is republished as the
ledger holds it, a forged one never displaces its victim's spend; usage stamped at no time, or covering more
items than SQLite counts, is billed instead of dead-lettered.
"""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.logic import Accountant
from frugalstream.llm.embedder import DIM, encode_vector
from frugalstream.llm.identity import usage_id
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, CostPoint, RoutedRequest, TokenUsage, UsageRecord
from frugalstream.schemas import topics as t
from tests.unit.test_dedupe import answer, ask, deduper, on_responses, on_routed, route, sources

# ---------------------------------------------------------------------------------------------------------------
# A carried embedding is a producer's bytes: a malformed one must never fail the partition's rebuild.

BAD_EMBEDDINGS = {
    "odd_bytes": "AAAA",  # three bytes: no float16 array
    "not_base64": "not base64 at all!",
    "other_size": base64.b64encode(np.ones(10, dtype=np.float16).tobytes()).decode(),
    "nan": encode_vector(np.full(DIM, np.nan, dtype=np.float32)),
    "zero": encode_vector(np.zeros(DIM, dtype=np.float32)),
}


@pytest.mark.parametrize("embedding", BAD_EMBEDDINGS.values(), ids=BAD_EMBEDDINGS.keys())
async def test_a_malformed_embedding_carried_into_llm_cache_does_not_wedge_the_rebuild(embedding: str) -> None:
    """A routed request's embedding travels into its answer's cache entry; the next owner's rebuild must load it
    (re-embedding the text) instead of raising on every attempt, which left the partition unhandled for good."""
    first = deduper()
    [routed] = await route(ask("a", "What are your business hours?"))
    routed = routed.model_copy(update={"embedding": embedding})
    outs = await on_routed(first, [routed])
    assert [o.topic for o in outs] == [t.DISPATCH]
    stored = [o.value for o in await on_responses(first, [(answer(routed), 0)]) if o.topic == t.CACHE]
    assert [e.embedding for e in stored] == [embedding]  # what the next owner reads back from llm.cache

    owner = deduper()
    assert await owner.load([(entry, 0) for entry in stored]) == 1
    [again] = await route(ask("b", "What are your business hours?"))
    assert sources(await on_routed(owner, [again])) == ["cache_exact"]


@pytest.mark.parametrize("embedding", BAD_EMBEDDINGS.values(), ids=BAD_EMBEDDINGS.keys())
async def test_a_routed_request_with_a_malformed_embedding_is_decided_as_if_it_carried_none(embedding: str) -> None:
    """Its text is embedded instead: no raise (the record was dead-lettered and answered `delivery_failed`)."""
    [cached] = await route(ask("a", "What are your business hours?"))
    [rewording] = await route(ask("b", "When are you open?"))
    decided = []
    for carried in (embedding, None):
        d = deduper()
        await on_routed(d, [cached])
        await on_responses(d, [(answer(cached), 0)])
        outs = await on_routed(d, [rewording.model_copy(update={"embedding": carried})])
        decided.append([(o.topic, getattr(o.value, "source", None)) for o in outs])
    assert decided[0] == decided[1]


# ---------------------------------------------------------------------------------------------------------------
# `cache_ttl_s` is how long a cached answer is served: an operator lowering it (a restart, which rebuilds from
# llm.cache) must not leave answers stored under the old TTL serving for days.

SHORT_TTL = Settings(semantic_task_types=("faq",), semantic_verifier="features", cache_ttl_s={"faq": 60, "default": 60})


def stored_entry(routed: RoutedRequest, *, age_s: float, expires_in_s: float | None) -> CacheEntry:
    now = time.time()
    return CacheEntry(keys=routed.keys, request_id="a", tenant="acme", content="We open at 9.",
                      model="gpt-4o-mini", output_tokens=5, task_type="faq", stored_at=now - age_s,
                      expires_at=None if expires_in_s is None else now + expires_in_s)


@pytest.mark.parametrize("expires_in_s", [6 * 86400, None], ids=["old_ttl", "never"])
async def test_an_entry_stored_under_a_longer_ttl_is_not_served_past_the_ttl_its_task_has_now(
        expires_in_s: float | None) -> None:
    [first] = await route(ask("a", "What are your business hours?"), settings=SHORT_TTL)
    d = deduper(SHORT_TTL)
    assert await d.load([(stored_entry(first, age_s=3600, expires_in_s=expires_in_s), 0)]) == 0
    [again] = await route(ask("b", "What are your business hours?"), settings=SHORT_TTL)
    assert [o.topic for o in await on_routed(d, [again])] == [t.DISPATCH]


async def test_an_entry_within_the_lowered_ttl_still_serves_until_it_runs_out() -> None:
    [first] = await route(ask("a", "What are your business hours?"), settings=SHORT_TTL)
    d = deduper(SHORT_TTL)
    assert await d.load([(stored_entry(first, age_s=10, expires_in_s=6 * 86400), 0)]) == 1
    [again] = await route(ask("b", "What are your business hours?"), settings=SHORT_TTL)
    assert sources(await on_routed(d, [again])) == ["cache_exact"]
    assert d.store.sweep(time.time() + 55) == 1  # it expires 60 s after it was stored, not in six days


async def test_an_entry_stamped_ahead_of_the_clock_does_not_outlive_its_ttl() -> None:
    """A `stored_at` in the future (a skewed clock, a crafted record) would keep `now - stored_at` under every
    max age and push the TTL out by the skew."""
    [first] = await route(ask("a", "What are your business hours?"), settings=SHORT_TTL)
    d = deduper(SHORT_TTL)
    assert await d.load([(stored_entry(first, age_s=-30 * 86400, expires_in_s=None), 0)]) == 1
    [entry] = list(d.store)
    assert entry.stored_at <= time.time() and entry.expires_at is not None and entry.expires_at <= time.time() + 60


# ---------------------------------------------------------------------------------------------------------------
# The ledger is the record: a usage id comes back with other content (a redelivered cache answer re-stamped, a
# catalog updated before the redelivery, a producer re-sending an id), and a tenant forging another's usage id.

CATALOG = PriceCatalog.load()
T0 = 1_760_000_400.0  # 2025-10-09T09:00:00Z


def usage(uid: str, tenant: str = "acme", *, tokens: int = 1000, at: float = T0) -> UsageRecord:
    return UsageRecord(id=uid, request_id=uid.rsplit(",", 1)[-1].strip('"]'), tenant=tenant, stage="gateway",
                       source="llm", baseline=CostPoint(model="gpt-4o", usage=TokenUsage(input_tokens=tokens)),
                       occurred_at=at, task_type="faq")


async def test_a_usage_id_seen_again_with_other_content_republishes_what_the_ledger_holds() -> None:
    """Downstream deduplicates cost events by id: two events under one id with other amounts or times leave it
    whichever it kept, not what the ledger and the budgets counted."""
    accountant = Accountant(CATALOG, Ledger(), metrics=Metrics())
    uid = usage_id("gateway", "acme", "r1")
    [first] = await accountant.handle([usage(uid)])
    again = await accountant.handle([usage(uid, tokens=1), usage(uid, tokens=5, at=T0 + 86_400)])
    assert again == [first, first]
    [one, copy] = await accountant.handle([usage(usage_id("gateway", "acme", "r2"), tokens=7),
                                           usage(usage_id("gateway", "acme", "r2"), tokens=9)])
    assert copy == one and one.data.usage is not None and one.data.usage.input_tokens == 7  # the stored one
    assert accountant.ledger.totals()["requests"] == 2


async def test_a_usage_record_naming_another_tenants_request_never_displaces_that_tenants_spend() -> None:
    """`evil` writes a free record under acme's usage id before acme's answer is billed: acme's spend must still
    reach the ledger and acme's budgets, and evil's record stays evil's."""
    accountant = Accountant(CATALOG, Ledger(), metrics=Metrics())
    uid = usage_id("gateway", "acme", "r1")
    [forged] = await accountant.handle([usage(uid, "evil", tokens=0)])
    [real] = await accountant.handle([usage(uid, "acme", tokens=1_000_000)])
    assert forged.id != real.id and (forged.subject, real.subject) == ("evil", "acme")
    assert accountant.ledger.spent("acme", None, T0 - 1, T0 + 1) == pytest.approx(2.5)
    assert accountant.ledger.spent("evil", None, T0 - 1, T0 + 1) == 0.0
    [redelivered] = await accountant.handle([usage(uid, "acme", tokens=1_000_000)])
    assert redelivered == real and accountant.ledger.totals()["requests"] == 2


async def test_the_event_id_of_a_record_of_its_own_tenant_is_unchanged() -> None:
    """Ids are what a ledger written before this release holds: a replay after an upgrade must find them."""
    accountant = Accountant(CATALOG, Ledger(), metrics=Metrics())
    own, summarizer = usage(usage_id("gateway", "acme", "r1")), usage("summarizer:abc123:call-0")
    events = await accountant.handle([own, summarizer])
    assert [e.id for e in events] == [cost_event(own, CATALOG).id, cost_event(summarizer, CATALOG).id]


@pytest.mark.parametrize("at", [T0 * 1000, float("nan"), float("inf"), -1.0, T0 + 400 * 86_400],
                         ids=["milliseconds", "nan", "inf", "before_1970", "a_year_ahead"])
async def test_usage_stamped_at_no_time_or_far_ahead_is_billed_now_and_counts_against_this_periods_budget(
        at: float) -> None:
    """A producer stamping milliseconds (or NaN) had its record dead-lettered, its spend gone from the ledger;
    one stamped a year ahead counted against no budget until then."""
    accountant = Accountant(CATALOG, Ledger(), clock=lambda: T0, metrics=Metrics())
    [event] = await accountant.handle([usage(usage_id("gateway", "acme", "r1"), tokens=1_000_000, at=at)])
    assert event.time == "2025-10-09T09:00:00.000000Z"
    assert accountant.ledger.spent("acme", None, T0 - 60, T0 + 60) == pytest.approx(2.5)


async def test_usage_within_the_clock_skew_keeps_its_own_time() -> None:
    accountant = Accountant(CATALOG, Ledger(), clock=lambda: T0, metrics=Metrics())
    events = await accountant.handle([usage(usage_id("gateway", "acme", f"r{i}"), at=at)
                                      for i, at in enumerate((T0 - 86_400 * 40, T0 + 600))])
    assert [e.time for e in events] == ["2025-08-30T09:00:00.000000Z", "2025-10-09T09:10:00.000000Z"]


# ---------------------------------------------------------------------------------------------------------------
# A deployment tried on the simulated provider, then switched to a real one on the same cluster: llm.cache still
# holds the simulator's placeholder answers (a week for faq), which must never reach a real user.

REAL = Settings(semantic_task_types=("faq",), semantic_verifier="features", provider="openai")


@pytest.mark.parametrize("simulated", [True, False])
async def test_a_real_providers_cache_never_serves_the_simulators_answers(simulated: bool) -> None:
    [first] = await route(ask("a", "What are your business hours?"))
    [again] = await route(ask("b", "What are your business hours?"))
    rebuilt = deduper(REAL)
    entry = stored_entry(first, age_s=10, expires_in_s=3600).model_copy(update={"simulated": simulated})
    assert await rebuilt.load([(entry, 0)]) == (0 if simulated else 1)
    assert sources(await on_routed(rebuilt, [again])) == ([] if simulated else ["cache_exact"])

    live = deduper(REAL)  # a simulated gateway still answering during the switch
    await on_routed(live, [first])
    stored = [o for o in await on_responses(live, [(answer(first).model_copy(update={"simulated": simulated}), 0)])
              if o.topic == t.CACHE]
    assert len(stored) == (0 if simulated else 1)
    assert sources(await on_routed(live, [again])) == ([] if simulated else ["cache_exact"])


async def test_the_simulators_cache_serves_its_own_answers() -> None:
    [first] = await route(ask("a", "What are your business hours?"))
    [again] = await route(ask("b", "What are your business hours?"))
    d = deduper()
    entry = stored_entry(first, age_s=10, expires_in_s=3600).model_copy(update={"simulated": True})
    assert await d.load([(entry, 0)]) == 1
    assert sources(await on_routed(d, [again])) == ["cache_exact"]


async def test_a_record_covering_more_items_than_sqlite_counts_keeps_its_spend() -> None:
    """`items` has no upper bound at the contract: past int64 the insert raised, and the record (its tokens real)
    was dead-lettered, its spend gone from the ledger and every budget."""
    accountant = Accountant(CATALOG, Ledger(), clock=lambda: T0, metrics=Metrics())
    record = usage(usage_id("gateway", "acme", "r1"), tokens=1_000_000).model_copy(update={"items": 10**20})
    [event, _] = await accountant.handle([record, usage(usage_id("gateway", "acme", "r2"), tokens=1_000_000)])
    assert event.data.items == 10**20  # the event says what the producer said
    assert accountant.ledger.spent("acme", None, T0 - 60, T0 + 60) == pytest.approx(5.0)
    assert accountant.ledger.totals()["items"] == 2**63 - 1 + 1
