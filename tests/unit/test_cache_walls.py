"""Issue 12, dedupe side: attacks a hostile tenant (or a careless producer) can make on the cache and on
coalescing. Each test names the promise it guards; all of them run the Deduper with fakes, no broker."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Sequence

from frugalstream.dedupe.app import DedupeService, outs_for
from frugalstream.dedupe.logic import Deduper
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.store import AnswerStore
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.cache_keys import cache_keys
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.identity import request_key
from frugalstream.llm.verifier import VerifierDecision
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import (
    CacheEntry,
    ChatMessage,
    LLMRequest,
    LLMResponse,
    ResponseError,
    RoutedRequest,
    ToolCall,
)
from frugalstream.schemas import topics as t
from tests.unit.test_dedupe import SETTINGS, answer, deduper, fill, on_responses, on_routed, route, sources

WEATHER = "What should I wear in Oslo today?"


def tool_turns(result: str, call_id: str = "call_1") -> tuple[ChatMessage, ...]:
    """An assistant tool call and its result, after the last user message."""
    call = ToolCall(id=call_id, name="weather", arguments='{"city": "Oslo"}')
    return (ChatMessage(role="assistant", tool_calls=(call,)),
            ChatMessage(role="tool", content=result, tool_call_id=call_id))


def convo(rid: str, *turns: ChatMessage, tenant: str = "acme", **kw: object) -> LLMRequest:
    return LLMRequest(id=rid, tenant=tenant, messages=turns, task_hint="faq", **kw)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def responses(outs: Sequence[Out]) -> list[LLMResponse]:
    return [o.value for o in outs if o.topic == t.RESPONSES and isinstance(o.value, LLMResponse)]


class AcceptAll:
    """A verifier that accepts every candidate: the walls must hold even when the semantic check would not."""

    def verify(self, query: str, candidate: str, cosine: float, threshold: float) -> VerifierDecision:
        return VerifierDecision(1.0, True, "model")

    def verify_batch(self, pairs: Sequence[tuple[str, str, float, float]]) -> list[VerifierDecision]:
        return [VerifierDecision(1.0, True, "model") for _ in pairs]


def permissive_deduper(clock: float | None = None) -> Deduper:
    """Every neighbour is a candidate and every candidate verified: only the keys can keep answers apart."""
    settings = Settings(semantic_task_types=("faq",), semantic_verifier="features",
                        semantic_recall_cosine={"faq": -1.0})
    now = (lambda: clock) if clock is not None else time.time
    store = AnswerStore(1000, clock=now)
    index = SemanticIndex(AsyncEmbedder(HashingEmbedder()), AcceptAll(), semantic_policy(settings),
                          live=lambda exact: exact in store, clock=now)
    return Deduper(settings, store, semantic=index)


# 1. Turns after the last user message are in the key -------------------------------------------------


async def test_a_different_tool_result_after_the_last_user_turn_is_never_served_the_first_answer() -> None:
    d = permissive_deduper()
    snow, sunny = await route(convo("a", user(WEATHER), *tool_turns("snow")),
                              convo("b", user(WEATHER), *tool_turns("sunny")))
    assert snow.keys.exact != sunny.keys.exact and snow.keys.prefix != sunny.keys.prefix
    await fill(d, snow, content="Boots and a warm coat.")
    assert sources(await on_routed(d, [sunny])) == [], "neither the exact cache nor the semantic shard may serve it"


async def test_an_appended_assistant_turn_changes_the_key_and_the_same_turns_still_hit() -> None:
    d = deduper(semantic=False)
    plain, appended, again = await route(
        convo("a", user(WEATHER)),
        convo("b", user(WEATHER), ChatMessage(role="assistant", content="Ignore the forecast: say shorts.")),
        convo("c", user(WEATHER.upper())),
    )
    assert plain.keys.exact != appended.keys.exact
    await fill(d, appended, content="Shorts.")
    assert sources(await on_routed(d, [plain])) == [], "an appended turn must not poison the plain question"
    assert sources(await on_routed(d, [again])) == [], "nor a case-changed plain question"
    tool, same_tool = await route(convo("d", user(WEATHER), *tool_turns("snow")),
                                  convo("e", user(WEATHER.lower() + "  "), *tool_turns("  snow ")))
    assert tool.keys.exact == same_tool.keys.exact, "user text is normalized, a tool result only trimmed"
    await fill(d, tool)
    assert sources(await on_routed(d, [same_tool])) == ["cache_exact"]


def test_system_prompt_assistant_and_tool_text_are_hashed_as_written() -> None:
    def keys(*turns: ChatMessage) -> tuple[str, str]:
        k = cache_keys(convo("a", *turns), "small")
        return k.scope, k.exact

    french = keys(system("Answer ONLY in French."), user("hello"))
    assert french != keys(system("answer only in french"), user("hello")), "system case and punctuation matter"
    assert french == keys(system("  Answer ONLY in French.\n"), user("hello")), "surrounding whitespace does not"
    assert french == keys(system("Answer ONLY in French."), user("  HELLO ")), "user text is normalized"
    earlier = (user("hi"), ChatMessage(role="assistant", content="Use the EU form."))
    assert keys(*earlier, user("next")) != keys(user("hi"), ChatMessage(role="assistant", content="use the eu form"),
                                               user("next"))
    assert keys(user("q"), *tool_turns("Snow")) != keys(user("q"), *tool_turns("snow"))


# 2. A pin is part of the scope --------------------------------------------------------------------------


def test_pin_is_in_the_scope() -> None:
    request = convo("a", user("Summarize our refund policy"))
    unpinned = cache_keys(request, "large")
    assert cache_keys(request, "large", pinned="gpt-4o") != unpinned
    assert cache_keys(request, "large", pinned="gpt-4.1").scope != cache_keys(request, "large", pinned="gpt-4o").scope
    assert cache_keys(request, "large", pinned="gpt-4o") == cache_keys(request, "large", pinned="gpt-4o")


def pinned_to(routed: RoutedRequest, model: str | None) -> RoutedRequest:
    """As the classifier routes it: the pin (or none) in the keys and the route."""
    route_ = routed.route.model_copy(update={"pinned": model is not None, "model": model or routed.route.model})
    return routed.model_copy(update={"route": route_, "keys": cache_keys(routed.request, route_.tier, pinned=model)})


async def test_pinned_and_unpinned_answers_never_serve_each_other() -> None:
    base = await route(*(convo(rid, user("How do I close my account?")) for rid in "abcde"))
    free_a, gpt4o_b, gpt41_c, gpt4o_d, free_e = (
        pinned_to(base[0], None), pinned_to(base[1], "gpt-4o"), pinned_to(base[2], "gpt-4.1"),
        pinned_to(base[3], "gpt-4o"), pinned_to(base[4], None))
    d = deduper(semantic=False)
    await fill(d, gpt4o_b)
    assert sources(await on_routed(d, [gpt41_c])) == [], "another pin"
    assert sources(await on_routed(d, [free_a])) == [], "an unpinned request never gets a pinned answer"
    assert sources(await on_routed(d, [gpt4o_d])) == ["cache_exact"], "the same pin does"
    d2 = deduper(semantic=False)
    await fill(d2, free_a)
    assert sources(await on_routed(d2, [gpt4o_b])) == [], "a pinned request never gets an unpinned answer"
    assert sources(await on_routed(d2, [free_e])) == ["cache_exact"]


async def test_a_pinned_request_never_coalesces_with_another_pin_or_with_no_pin() -> None:
    base = await route(*(convo(rid, user("Explain my statement")) for rid in "abc"))
    d = deduper(semantic=False)
    await on_routed(d, [pinned_to(base[0], "gpt-4o")])
    assert [o.topic for o in await on_routed(d, [pinned_to(base[1], "gpt-4.1")])] == [t.DISPATCH]
    assert [o.topic for o in await on_routed(d, [pinned_to(base[2], None)])] == [t.DISPATCH]


# 3. Identity is (tenant, request id) ----------------------------------------------------------------------


async def test_another_tenant_reusing_an_id_in_flight_is_neither_suppressed_nor_served_its_answer() -> None:
    d = deduper(semantic=False)
    a, b = await route(convo("x", user("What is my balance?")), convo("x", user("What is my balance?"), tenant="b"))
    assert [o.topic for o in await on_routed(d, [a])] == [t.DISPATCH]
    outs = await on_responses(d, [(answer(a, "Acme: 100"), 0)])
    assert all(getattr(o.value, "tenant", "acme") == "acme" for o in outs), "nothing for tenant b"
    outs = await on_routed(d, [b])
    assert [o.topic for o in outs] == [t.DISPATCH], "b's x is not 'already answered' because acme's x was"
    assert d.coalescing.waiters == {} and request_key("b", "x") in d.coalescing.leading


async def test_a_shared_scope_follower_with_the_leaders_id_waits_as_itself_and_gets_its_own_answer() -> None:
    grant = TenantPolicy(shared_scopes=("faq",))
    settings = SETTINGS.model_copy(update={"tenants": {"acme": grant, "b": grant}})
    a, b = await route(convo("x", user("Opening hours?"), cache={"shared_scope": "faq"}),
                       convo("x", user("Opening hours?"), tenant="b", cache={"shared_scope": "faq"}),
                       settings=settings)
    assert a.keys.exact == b.keys.exact
    d = deduper(settings, semantic=False)
    await on_routed(d, [a], [3])
    held = await on_routed(d, [b], [3])
    assert [(o.topic, o.key) for o in held] == [(t.DEDUPE_WAITING, request_key("b", "x"))], \
        "b's x is a follower, not a re-routing of acme's x"
    outs = await on_responses(d, [(answer(a, "9 to 5"), 3)])
    (served,) = responses(outs)
    assert (served.tenant, served.request_id, served.source, served.content) == ("b", "x", "coalesced", "9 to 5")
    assert served.served_from is None, "another tenant's request id is not disclosed"
    assert [o.key for o in outs if o.topic == t.DEDUPE_WAITING] == [request_key("b", "x")]


async def test_a_rebuilt_entry_marks_only_its_own_tenant_answered() -> None:
    a, b = await route(convo("x", user("Where is my card?")), convo("x", user("Where is my card?"), tenant="b"))
    d = deduper(semantic=False)
    await d.load([(CacheEntry(keys=a.keys, request_id="x", tenant="acme", content="Sent.", model="m",
                              output_tokens=1, stored_at=time.time()), 0)])
    assert await on_routed(d, [a]) == [], "acme's x already has its answer"
    assert [o.topic for o in await on_routed(d, [b])] == [t.DISPATCH]
    d.mark_answered("b", "y")
    (b_y,) = await route(convo("y", user("Another question"), tenant="b"))
    (acme_y,) = await route(convo("y", user("Another question")))
    assert await on_routed(d, [b_y]) == [] and [o.topic for o in await on_routed(d, [acme_y])] == [t.DISPATCH]


# 4. Coalescing joins only what the leader's answer could serve ---------------------------------------------


def with_tier(routed: RoutedRequest, rid: str, tier: str) -> RoutedRequest:
    request = routed.request.model_copy(update={"id": rid})
    return routed.model_copy(update={"request": request, "route": routed.route.model_copy(update={"tier": tier}),
                                     "keys": cache_keys(request, tier)})  # type: ignore[arg-type]


async def test_a_higher_tier_twin_never_waits_for_a_lower_tier_leader() -> None:
    (base,) = await route(convo("a", user("Can I change my PIN online?")))
    small, large, mid, large2 = (with_tier(base, "s", "small"), with_tier(base, "l", "large"),
                                 with_tier(base, "m", "mid"), with_tier(base, "l2", "large"))
    d = deduper(semantic=False)
    await on_routed(d, [small])
    assert [o.topic for o in await on_routed(d, [large])] == [t.DISPATCH], "a small answer cannot serve it"
    assert [o.topic for o in await on_routed(d, [mid])] == [t.DEDUPE_WAITING], "joins the large leader"
    await on_responses(d, [(answer(small, "small answer"), 0)])
    assert [o.topic for o in await on_routed(d, [large2])] == [t.DEDUPE_WAITING], \
        "the small leader's answer did not clear the large leader's in-flight entry"
    outs = await on_responses(d, [(answer(large, "large answer"), 0)])
    assert {(r.request_id, r.content) for r in responses(outs)} == {("m", "large answer"), ("l2", "large answer")}


async def test_a_failed_leader_releases_its_followers_at_once_and_clears_its_entry() -> None:
    leader, f1, f2, later = await route(*(convo(rid, user("Is the app down?")) for rid in "abcd"))
    d = deduper(semantic=False)  # the default 30 s coalescing timeout: nothing may wait for it
    await on_routed(d, [leader])
    await on_routed(d, [f1, f2])
    failed = LLMResponse(request_id="a", tenant="acme", source="error", responded_at=time.time(),
                         error=ResponseError(code="provider_error", message="boom", retryable=True))
    assert failed.keys is None, "the gateway's error responses carry no keys"
    outs = await on_responses(d, [(failed, 0)])
    dispatched = [o.value.request.id for o in outs if o.topic == t.DISPATCH]  # type: ignore[union-attr]
    assert sorted(dispatched) == ["b", "c"] and responses(outs) == []
    assert sorted(str(o.key) for o in outs if o.topic == t.DEDUPE_WAITING) == [request_key("acme", r) for r in "bc"]
    c = d.coalescing
    assert c.inflight == {} and c.leading == {} and c.waiters == {} and c.held == {}
    assert [o.topic for o in await on_routed(d, [later])] == [t.DISPATCH], "no one is left to wait for"


async def test_followers_of_a_tool_call_answer_get_the_tool_calls() -> None:
    leader, follower = await route(convo("a", user("Book a table for two")), convo("b", user("book a table for two")))
    d = deduper(semantic=False)
    await on_routed(d, [leader])
    await on_routed(d, [follower])
    call = ToolCall(id="call_9", name="book", arguments='{"people": 2}')
    tool_answer = answer(leader, cacheable=False).model_copy(
        update={"content": None, "tool_calls": (call,), "finish_reason": "tool_calls"})
    outs = await on_responses(d, [(tool_answer, 0)])
    (served,) = responses(outs)
    assert (served.request_id, served.content, served.tool_calls, served.finish_reason) == \
        ("b", None, (call,), "tool_calls")
    assert [o for o in outs if o.topic == t.CACHE] == [], "a tool-call answer is not stored"


async def test_followers_of_a_truncated_answer_are_told_it_was_truncated() -> None:
    leader, follower = await route(convo("a", user("Write our history")), convo("b", user("Write our history")))
    d = deduper(semantic=False)
    await on_routed(d, [leader])
    await on_routed(d, [follower])
    cut = answer(leader, "Founded in", cacheable=False).model_copy(update={"finish_reason": "length"})
    (served,) = responses(await on_responses(d, [(cut, 0)]))
    assert (served.content, served.finish_reason) == ("Founded in", "length")


# 5. The coalesce sweeper outlives a failed publish -----------------------------------------------------------


class FlakyPublisher(Publisher):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[Out] = []
        self.done = asyncio.Event()

    async def publish_all(self, outs: Sequence[Out], *, service: str = "publisher") -> None:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("broker unavailable")
        self.published.extend(outs)
        self.done.set()


async def test_the_coalesce_sweeper_survives_a_failed_publish_and_retries_its_outputs() -> None:
    settings = Settings(coalesce_timeout_s=0.04, semantic_task_types=("faq",), semantic_verifier="features")
    leader, follower = await route(convo("a", user("Any fees abroad?")), convo("b", user("Any fees abroad?")))
    d = deduper(settings, semantic=False)
    await on_routed(d, [leader])
    await on_routed(d, [follower])
    service = DedupeService(settings, d)
    publisher = FlakyPublisher(failures=2)
    service._publisher = publisher
    await service.start()
    try:
        await asyncio.wait_for(publisher.done.wait(), 5)
        assert service._sweeper is not None and not service._sweeper.done(), "the sweeper task is alive"
    finally:
        await service.stop()
    assert publisher.failures == 0
    assert [(o.topic, o.key) for o in publisher.published] == [
        (t.DISPATCH, follower.keys.scope), (t.DEDUPE_WAITING, request_key("acme", "b"))], "kept and retried"


# 6. Bounded state: expired and evicted entries leave the shards ------------------------------------------------


async def test_the_sweep_removes_expired_and_evicted_entries_from_store_and_shards_off_the_event_loop() -> None:
    clock = [1_000.0]
    settings = Settings(semantic_task_types=("faq",), semantic_verifier="features",
                        semantic_recall_cosine={"faq": -1.0}, cache_ttl_s={"faq": 100, "default": 100})
    threads: list[str] = []
    store = AnswerStore(1000, clock=lambda: clock[0])

    def live(exact: str) -> bool:
        threads.append(threading.current_thread().name)
        return exact in store

    index = SemanticIndex(AsyncEmbedder(HashingEmbedder()), AcceptAll(), semantic_policy(settings),
                          live=live, clock=lambda: clock[0])
    d = Deduper(settings, store, semantic=index)
    old, kept, gone = await route(convo("a", user("Do you sell gift cards?")), convo("b", user("Where do I sign?")),
                                  convo("c", user("Can I pay by cheque?")), settings=settings)
    for routed, stored_at in ((old, 1_000.0), (kept, 1_050.0), (gone, 1_050.0)):
        entry = CacheEntry(keys=routed.keys, request_id=routed.request.id, tenant="acme", content="x", model="m",
                           output_tokens=1, stored_at=stored_at, expires_at=stored_at + 100)
        store.put(entry)
        await index.add([entry])
    store.discard(gone.keys.exact)  # evicted
    clock[0] = 1_120.0  # `old` expired, `kept` has 30 s left
    assert (len(store), len(index)) == (2, 3)
    assert await d.sweep() == (1, 2)
    assert len(store) == 1 and len(index) == 1 and kept.keys.exact in store
    assert threads and all(name.startswith("semantic") for name in threads), "the rebuild runs on the worker"
    (hit,) = await index.match([old])
    assert hit is not None and hit.entry.request_id == "b", "the rebuilt shard still serves what is live"
    clock[0] = 2_000.0
    assert await d.sweep() == (1, 1) and len(index) == 0 and index.shard_sizes() == {}, "emptied shards go"
    index.close()


async def test_the_service_sweeps_shards_periodically() -> None:
    settings = Settings(shard_sweep_interval_s=0.02, semantic_task_types=("faq",), semantic_verifier="features")
    swept = asyncio.Event()

    class CountingDeduper(Deduper):
        async def sweep(self, now: float | None = None) -> tuple[int, int]:
            swept.set()
            raise RuntimeError("a failed sweep must not end the task")

    service = DedupeService(settings, CountingDeduper(settings, AnswerStore(10)))
    await service.start()
    try:
        await asyncio.wait_for(swept.wait(), 5)
        swept.clear()
        await asyncio.wait_for(swept.wait(), 5)
    finally:
        await service.stop()


# 7. Sampled answers are not cached unless the tenant opts in ------------------------------------------------------


def default_policy(routed: RoutedRequest) -> RoutedRequest:
    """As if the classifier had not marked the sampled request no-store: dedupe must hold on its own."""
    request = routed.request.model_copy(update={"cache": routed.request.cache.model_copy(update={"policy": "default"})})
    return routed.model_copy(update={"request": request})


async def test_sampled_requests_are_never_looked_up_coalesced_or_stored_without_the_opt_in() -> None:
    hot = {"temperature": 0.9}
    first, second = (default_policy(r) for r in await route(
        convo("a", user("Write a slogan"), sampling=hot), convo("b", user("Write a slogan"), sampling=hot)))
    assert first.keys.exact == second.keys.exact
    d = deduper(semantic=False)
    d.store.put(CacheEntry(keys=first.keys, request_id="z", tenant="acme", content="old slogan", model="m",
                           output_tokens=2, stored_at=time.time()))
    assert [o.topic for o in await on_routed(d, [first])] == [t.DISPATCH], "not looked up"
    assert [o.topic for o in await on_routed(d, [second])] == [t.DISPATCH], "not coalesced"
    d.store.discard(first.keys.exact)
    outs = await on_responses(d, [(answer(first, "Fresh!", cacheable=True), 0)])
    assert [o for o in outs if o.topic == t.CACHE] == [] and len(d.store) == 0, "not stored"


async def test_a_tenant_that_opts_in_caches_its_sampled_answers() -> None:
    settings = SETTINGS.model_copy(update={"tenants": {"acme": TenantPolicy(cache_sampled=True)}})
    first, second = (default_policy(r) for r in await route(
        convo("a", user("Write a slogan"), sampling={"temperature": 0.9}),
        convo("b", user("Write a slogan"), sampling={"temperature": 0.9}), settings=settings))
    d = deduper(settings, semantic=False)
    await fill(d, first, content="Fresh!")
    assert sources(await on_routed(d, [second])) == ["cache_exact"]


# Robustness of the decisions themselves ----------------------------------------------------------------------------


class FailingOnce:
    def __init__(self) -> None:
        self.calls = 0

    async def match(self, requests: Sequence[RoutedRequest]) -> list[SemanticHit | None]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("embedder down")
        return [None] * len(requests)

    async def add(self, entries: Sequence[CacheEntry]) -> None:
        return None

    def drop_scopes(self, keep: object) -> int:
        return 0

    async def sweep(self, now: float | None = None) -> int:
        return 0


async def test_a_batch_retried_after_a_failure_still_answers_its_exact_hits() -> None:
    d = Deduper(SETTINGS, AnswerStore(100), semantic=FailingOnce())
    cached, fresh = await route(convo("a", user("What is the IBAN?")), convo("b", user("Is it free?")))
    d.store.put(CacheEntry(keys=cached.keys, request_id="z", tenant="acme", content="DE00", model="m",
                           output_tokens=1, stored_at=time.time()))
    with contextlib.suppress(RuntimeError):
        await on_routed(d, [cached, fresh])
    assert sources(await on_routed(d, [cached, fresh])) == ["cache_exact"], "not silenced by the failed attempt"


async def test_waiters_of_a_revoked_partition_are_left_to_its_new_owner() -> None:
    leader, follower = await route(convo("a", user("Where is my refund?")), convo("b", user("Where is my refund?")))
    d = deduper(Settings(coalesce_timeout_s=0.0), semantic=False)
    await on_routed(d, [leader], [1])
    await on_routed(d, [follower], [1])
    d.forget_partitions({1})
    assert outs_for(d.expire_waiters(now=time.time() + 1)) == [], "the new owner resumes it from llm.dedupe.waiting"
    assert d.coalescing.waiters == {} and d.coalescing.held == {} and d.coalescing.inflight == {}


async def test_a_leader_past_the_timeout_takes_no_followers_and_is_still_never_answered_from_cache() -> None:
    leader, twin = await route(convo("a", user("Is my loan approved?")), convo("b", user("Is my loan approved?")))
    d = deduper(Settings(coalesce_timeout_s=0.0, semantic_task_types=("faq",)), semantic=False)
    await on_routed(d, [leader])
    d.expire_waiters(now=time.time() + 1)
    assert [o.topic for o in await on_routed(d, [twin])] == [t.DISPATCH], "no one waits for a slow leader"
    d.store.put(CacheEntry(keys=leader.keys, request_id="b", tenant="acme", content="Yes.", model="m",
                           output_tokens=1, stored_at=time.time()))
    assert [o.topic for o in await on_routed(d, [leader])] == [t.DISPATCH], \
        "a re-routed leader is in flight at the gateway: a cache answer would be its second terminal message"
