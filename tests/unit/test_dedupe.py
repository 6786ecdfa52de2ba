"""Dedupe decisions without a broker: scopes are walls, tiers only serve downwards, grey zone misses."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.app import outs_for
from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.store import AnswerStore
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.identity import request_key
from frugalstream.llm.tokens import TokenCounter
from frugalstream.llm.verifier import TrainedVerifier, VerifierDecision
from frugalstream.runtime.metrics import Metrics
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import CacheEntry, ChatMessage, LLMRequest, LLMResponse, RoutedRequest, Tier, TokenUsage
from frugalstream.schemas import topics as t

SETTINGS = Settings(semantic_task_types=("faq",), semantic_verifier="features")  # the torch-free verifier


async def route(*requests: LLMRequest, settings: Settings = SETTINGS) -> list[RoutedRequest]:
    embedder = AsyncEmbedder(HashingEmbedder())
    results = await Classifier(settings, TokenCounter(), embedder=embedder).handle(list(requests))
    embedder.close()
    routed = [r.routed for r in results if isinstance(r, Routed)]
    assert len(routed) == len(requests)
    return routed


def ask(rid: str, text: str, tenant: str = "acme", history: tuple[ChatMessage, ...] = (), **kw: object) -> LLMRequest:
    return LLMRequest(id=rid, tenant=tenant, messages=(*history, ChatMessage(role="user", content=text)),
                      task_hint="faq", **kw)  # type: ignore[arg-type]


def answer(routed: RoutedRequest, content: str = "We open at 9.", *, cacheable: bool = True) -> LLMResponse:
    return LLMResponse(request_id=routed.request.id, tenant=routed.request.tenant, source="llm", content=content,
                       model=routed.route.model, tier=routed.route.tier, task_type=routed.route.task_type,
                       finish_reason="stop", usage=TokenUsage(output_tokens=5), keys=routed.keys,
                       cacheable=cacheable, responded_at=time.time())


def deduper(settings: Settings = SETTINGS, *, semantic: bool = True) -> Deduper:
    store = AnswerStore(1000)
    index = SemanticIndex(AsyncEmbedder(HashingEmbedder()), TrainedVerifier.load(), semantic_policy(settings),
                          live=lambda exact: exact in store) if semantic else None
    return Deduper(settings, store, semantic=index, metrics=Metrics())


async def on_routed(d: Deduper, batch: Sequence[RoutedRequest], partitions: Sequence[int] | None = None) -> list[Out]:
    """What the service publishes for these routed requests (on partition 0 unless told)."""
    return outs_for(await d.handle(requests=list(zip(batch, partitions or [0] * len(batch), strict=True))))


async def on_responses(d: Deduper, batch: Sequence[tuple[LLMResponse, int]]) -> list[Out]:
    """What the service publishes for these responses."""
    return outs_for(await d.handle(answers=batch))


def sources(outs: Sequence[object]) -> list[str]:
    return [o.value.source for o in outs if getattr(o, "topic", None) == t.RESPONSES]  # type: ignore[attr-defined]


async def fill(d: Deduper, routed: RoutedRequest, **kw: object) -> None:
    dispatched = await on_routed(d, [routed])
    assert [o.topic for o in dispatched] == [t.DISPATCH]
    await on_responses(d, [(answer(routed, **kw), 0)])  # type: ignore[arg-type]


async def test_identical_question_from_another_tenant_is_never_a_hit() -> None:
    d = deduper()
    first, other, same = await route(ask("a", "What are your business hours?"),
                                     ask("b", "What are your business hours?", tenant="globex"),
                                     ask("c", "what are your business hours"))
    await fill(d, first)
    assert sources(await on_routed(d, [other])) == []  # dispatched, not served
    assert sources(await on_routed(d, [same])) == ["cache_exact"]


async def test_shared_scope_is_opt_in_on_both_sides() -> None:
    # Shared scopes are granted by tenant policy (the classifier refuses a scope no policy grants).
    grant = TenantPolicy(shared_scopes=("public-faq",))
    settings = SETTINGS.model_copy(update={"tenants": {"acme": grant, "globex": grant}})
    d = deduper(settings)
    shared = {"shared_scope": "public-faq"}
    a, b, c = await route(ask("a", "Where is the nearest branch?", cache=shared),
                          ask("b", "Where is the nearest branch?", tenant="globex", cache=shared),
                          ask("c", "Where is the nearest branch?", tenant="initech"), settings=settings)
    await fill(d, a)
    assert sources(await on_routed(d, [b])) == ["cache_exact"]
    assert sources(await on_routed(d, [c])) == []


def at_tier(routed: RoutedRequest, tier: Tier) -> RoutedRequest:
    """The same unpinned request as if the classifier had routed it to `tier`."""
    return routed.model_copy(update={"route": routed.route.model_copy(update={"tier": tier}),
                                     "keys": cache_keys(routed.request, tier)})


async def test_answer_serves_same_or_lower_tier_never_higher() -> None:
    # (Pins are part of the scope since issue 12, so the tiers are set here rather than by pinning models.)
    d = deduper()
    (routed,) = await route(ask("a", "How do I reset my password?"))
    large, small = at_tier(routed, "large"), at_tier(routed.model_copy(update={
        "request": routed.request.model_copy(update={"id": "b"})}), "small")
    assert (large.keys.scope, large.keys.exact) == (small.keys.scope, small.keys.exact)
    await fill(d, small)
    assert sources(await on_routed(d, [large])) == [], "a small-tier answer never serves a large-tier request"
    d2 = deduper()
    await fill(d2, large)
    assert sources(await on_routed(d2, [small])) == ["cache_exact"]


async def test_multi_turn_matches_only_with_identical_history() -> None:
    d = deduper()
    h1 = (ChatMessage(role="user", content="I have a savings account."), ChatMessage(role="assistant", content="ok"))
    h2 = (ChatMessage(role="user", content="I have a credit card."), ChatMessage(role="assistant", content="ok"))
    first, other_history, same_history = await route(ask("a", "What is the fee?", history=h1),
                                                     ask("b", "What is the fee?", history=h2),
                                                     ask("c", "What is the fee?", history=h1))
    await fill(d, first)
    assert sources(await on_routed(d, [other_history])) == []
    assert sources(await on_routed(d, [same_history])) == ["cache_exact"]


async def test_no_cache_skips_lookup_and_no_store_is_never_stored() -> None:
    d = deduper()
    stored, no_cache, no_store, later = await route(
        ask("a", "Do you have a mobile app?"), ask("b", "Do you have a mobile app?", cache={"policy": "no-cache"}),
        ask("c", "Can I open an account online?", cache={"policy": "no-store"}),
        ask("d", "Can I open an account online?"))
    await fill(d, stored)
    assert [o.topic for o in await on_routed(d, [no_cache])] == [t.DISPATCH]
    await on_routed(d, [no_store])
    await on_responses(d, [(answer(no_store, cacheable=False), 0)])
    assert sources(await on_routed(d, [later])) == []


async def test_concurrent_duplicates_coalesce_and_are_released_by_the_answer() -> None:
    d = deduper(semantic=False)
    leader, follower = await route(ask("a", "Is there an overdraft fee?"), ask("b", "is there an overdraft fee"))
    assert [o.topic for o in await on_routed(d, [leader], [1])] == [t.DISPATCH]
    held = await on_routed(d, [follower], [1])
    assert [(o.topic, o.key, o.partition) for o in held] == [(t.DEDUPE_WAITING, request_key("acme", "b"), 1)], \
        "waiting is durable, keyed by identity"
    outs = await on_responses(d, [(answer(leader), 1)])
    assert sources(outs) == ["coalesced"]
    cache = [o for o in outs if o.topic == t.CACHE]
    assert len(cache) == 1 and cache[0].partition == 1, "the entry goes to the partition its answer came from"
    released = [o for o in outs if o.topic == t.DEDUPE_WAITING]
    assert [(o.key, o.value) for o in released] == [(request_key("acme", "b"), None)], \
        "a tombstone releases the waiting request"


async def test_waiting_requests_of_a_stopped_owner_are_resumed() -> None:
    leader, follower = await route(ask("a", "Do you charge for wires?"), ask("b", "Do you charge for wires?"))
    old = deduper(semantic=False)
    await on_routed(old, [leader], [2])
    (held,) = await on_routed(old, [follower], [2])
    assert held.value is follower
    # A new owner of partition 2 that already has the answer serves the follower and releases it.
    new = deduper(semantic=False)
    await new.load([(CacheEntry(keys=leader.keys, request_id="a", tenant="acme", content="No.", model="m",
                                output_tokens=2, stored_at=time.time()), 2)])
    outs = outs_for(await new.restore_waiters([(follower, 2)]))
    assert sources(outs) == ["cache_exact"]
    assert [(o.key, o.value) for o in outs if o.topic == t.DEDUPE_WAITING] == [(request_key("acme", "b"), None)]
    # Without the answer, the follower is dispatched on its own (paying is better than losing it).
    lone = deduper(semantic=False)
    outs = outs_for(await lone.restore_waiters([(follower, 2)]))
    assert [o.topic for o in outs] == [t.DISPATCH, t.DEDUPE_WAITING]


async def test_coalesced_follower_is_dispatched_after_the_timeout() -> None:
    d = deduper(Settings(coalesce_timeout_s=0.0), semantic=False)
    leader, follower = await route(ask("a", "Is there an ATM fee?"), ask("b", "Is there an ATM fee?"))
    await on_routed(d, [leader])
    assert [o.topic for o in await on_routed(d, [follower])] == [t.DEDUPE_WAITING]
    late = outs_for(d.expire_waiters(now=time.time() + 1))
    assert [o.topic for o in late] == [t.DISPATCH, t.DEDUPE_WAITING] and late[0].value.request.id == "b"
    assert late[1].value is None


async def test_expired_entries_are_not_served() -> None:
    store = AnswerStore(10, clock=lambda: 1000.0)
    (routed,) = await route(ask("a", "What is my card limit?"))
    store.put(CacheEntry(keys=routed.keys, request_id="a", tenant="acme", content="x", model="m", output_tokens=1,
                         stored_at=900.0, expires_at=999.0))
    assert store.get(routed.keys.exact, 0) is None


def test_eviction_keeps_the_costlier_entries() -> None:
    store = AnswerStore(10, clock=lambda: 0.0)
    from frugalstream.schemas import CacheKeys

    for n in range(11):
        keys = CacheKeys(scope="s", exact=f"e{n}", prefix="", lookup_text=f"q{n}", tier_rank=0)
        store.put(CacheEntry(keys=keys, request_id=f"r{n}", tenant="t", content="x", model="m", output_tokens=1,
                             stored_at=0.0, cost_weight=100.0 if n < 5 else 1.0))
    assert len(store) < 11 and all(f"e{n}" in store for n in range(5))


@pytest.mark.parametrize(("cached", "asked"), [
    ("Flights from Paris to London", "Flights from London to Paris"),
    ("Can I transfer 500 dollars today?", "Can I transfer 5000 dollars today?"),
    ("Is my card blocked?", "Is my card not blocked?"),
])
async def test_look_alike_questions_with_another_meaning_are_misses(cached: str, asked: str) -> None:
    d = deduper()
    first, second = await route(ask("a", cached), ask("b", asked))
    await fill(d, first)
    assert sources(await on_routed(d, [second])) == []


async def test_redelivered_request_is_not_answered_again_from_its_own_entry() -> None:
    d = deduper()
    (routed,) = await route(ask("a", "What is the routing number?"))
    await fill(d, routed)
    assert await on_routed(d, [routed]) == [], "its answer was already published by the gateway"


async def test_a_re_routed_request_that_was_already_answered_gets_no_second_answer() -> None:
    # A classifier crash between publishing and committing re-routes requests dedupe already answered.
    d = deduper(semantic=False)
    leader, follower = await route(ask("a", "Can I freeze my card?"), ask("b", "Can I freeze my card?"))
    await on_routed(d, [leader])
    await on_routed(d, [follower])
    assert sources(await on_responses(d, [(answer(leader), 0)])) == ["coalesced"]
    assert await on_routed(d, [follower]) == [], "b was answered (coalesced); the cache must not answer it again"
    assert await on_routed(d, [leader]) == [], "a was answered by the model"


async def test_a_request_re_routed_while_it_waits_is_answered_once() -> None:
    d = deduper(semantic=False)
    leader, follower = await route(ask("a", "Can I get a new PIN?"), ask("b", "Can I get a new PIN?"))
    await on_routed(d, [leader])
    assert [o.topic for o in await on_routed(d, [follower])] == [t.DEDUPE_WAITING]
    again = await on_routed(d, [follower])
    assert [(o.topic, o.value) for o in again] == [(t.DEDUPE_WAITING, follower)], \
        "already held: its identical held record is written again (a retried batch), no answer, no dispatch"
    assert sources(await on_responses(d, [(answer(leader), 0)])) == ["coalesced"]


class LastWordVerifier:
    """Accepts a candidate whose last word is the query's; records each batch it is asked."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str, float, float]]] = []

    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision:
        return self.verify_batch([(query, candidate, cosine, threshold)])[0]

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        self.batches.append(list(pairs))
        same = [q.split()[-1] == c.split()[-1] for q, c, _, _ in pairs]
        return [VerifierDecision(float(ok), ok, "model") for ok in same]


async def test_all_candidates_of_a_batch_are_verified_at_once_and_the_best_accepted_one_serves() -> None:
    settings = Settings(semantic_task_types=("faq",), semantic_verifier="features",
                        semantic_recall_cosine={"faq": -1.0})  # every neighbour is a candidate
    store, verifier = AnswerStore(1000), LastWordVerifier()
    index = SemanticIndex(AsyncEmbedder(HashingEmbedder()), verifier, semantic_policy(settings),
                          live=lambda exact: exact in store)
    d = Deduper(settings, store, semantic=index, metrics=Metrics())
    branch, atm, office, q1, q2 = await route(
        ask("a", "Where is your nearest branch"), ask("b", "Where is your nearest atm"),
        ask("e", "Where is your nearest office"), ask("c", "where is the closest branch"),
        ask("d", "where is the closest atm"), settings=settings)
    await fill(d, branch, content="Main St.")
    await fill(d, atm, content="By the station.")
    await fill(d, office, content="Head office.")
    verifier.batches.clear()
    outs = await on_routed(d, [q1, q2])
    # one call; each request sends its 2 nearest of the 3 cached questions (verify_candidates)
    assert len(verifier.batches) == 1 and len(verifier.batches[0]) == 4
    served = {o.value.request_id: o.value.content for o in outs if o.topic == t.RESPONSES}  # type: ignore[attr-defined]
    assert served == {"c": "Main St.", "d": "By the station."}
