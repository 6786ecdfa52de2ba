"""A refusing budget refuses spend, not answers that cost nothing: a request over a `refuse` budget is still
served from the cache or by a twin already in flight, at its own tier; anything else is answered
`budget_exceeded`, and no model is called for it, nor an audit bought."""

from __future__ import annotations

import time

from frugalstream.classifier.logic import Classifier, Refused, Routed
from frugalstream.dedupe.app import outs_for
from frugalstream.dedupe.results import Answer, Audit, Dispatch, Hold, Refusal
from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import BudgetState, CacheControl, LLMRequest, LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from tests.unit.test_answer_clusters import SETTINGS as CLUSTER_SETTINGS
from tests.unit.test_answer_clusters import Space, answered_clusters
from tests.unit.test_answer_clusters import routed as cluster_routed
from tests.unit.test_dedupe import answer, ask, deduper, fill, on_responses, on_routed, route, sources
from tests.unit.test_gateway_idempotency import CountingProvider

REASON = "budget acme/*/day is over its limit"


def over_refuse() -> BudgetBook:
    book = BudgetBook(clock=lambda: 1.0)
    book.update(BudgetState.model_validate({
        "budget_id": "acme/*/day", "tenant": "acme", "period": "day", "period_start": "1970-01-01T00:00:00Z",
        "limit_usd": 1.0, "spent_usd": 2.0, "status": "over", "action": "refuse", "updated_at": 1.0}))
    return book


def refused(routed: RoutedRequest) -> RoutedRequest:
    return routed.model_copy(update={"route": routed.route.model_copy(update={"refused_by_budget": REASON})})


def refusals(outs: list[object]) -> list[LLMResponse]:
    return [o.value for o in outs if getattr(o, "topic", None) == t.RESPONSES  # type: ignore[attr-defined]
            and o.value.error is not None and o.value.error.code == "budget_exceeded"]  # type: ignore[attr-defined]


async def test_the_classifier_passes_on_refused_spend_only_where_a_free_answer_may_serve_it() -> None:
    settings = Settings(semantic_task_types=("faq",), semantic_verifier="features")
    embedder = AsyncEmbedder(HashingEmbedder())
    budgeted = Classifier(settings, TokenCounter(), embedder=embedder, budgets=over_refuse(),
                          catalog=PriceCatalog.load())
    free = Classifier(settings, TokenCounter(), embedder=embedder, catalog=PriceCatalog.load())
    essay = LLMRequest.model_validate({"id": "e", "tenant": "acme", "messages": [
        {"role": "user", "content": "Prove that there are infinitely many primes, step by step, rigorously."}]})
    cacheable = [ask("a", "What are your opening hours?"), essay]
    uncacheable = [ask("n", "What are your opening hours?", cache=CacheControl(policy="no-cache")),
                   ask("s", "What are your opening hours?", sampling={"temperature": 0.9})]
    results = await budgeted.handle([*cacheable, *uncacheable])
    unbudgeted = {r.routed.request.id: r.routed.route for r in await free.handle(cacheable) if isinstance(r, Routed)}
    embedder.close()
    routed = {r.routed.request.id: r.routed.route for r in results if isinstance(r, Routed)}
    denied = {r.request.id: r.response for r in results if isinstance(r, Refused)}
    assert set(routed) == {"a", "e"} and set(denied) == {"n", "s"}
    for rid, decided in routed.items():
        assert decided.refused_by_budget == REASON
        # its own tier, not the small one a downgrade would give: a cheaper answer is not the one it asked for
        assert (decided.tier, decided.model) == (unbudgeted[rid].tier, unbudgeted[rid].model)
        assert not decided.downgraded_by_budget
    assert {r.error.code for r in denied.values() if r.error} == {"budget_exceeded"}


async def test_refused_spend_is_served_from_the_cache_and_refused_on_a_miss() -> None:
    d = deduper(semantic=False)
    cached, again, new = await route(ask("a", "Is there an overdraft fee?"), ask("b", "Is there an overdraft fee?"),
                                     ask("c", "Do you open on Sundays?"))
    await fill(d, cached)
    outs = await on_routed(d, [refused(again), refused(new)])
    assert sources(outs) == ["cache_exact", "error"]
    assert [r.request_id for r in refusals(outs)] == ["c"]
    assert t.DISPATCH not in {o.topic for o in outs}, "a refused miss never reaches the gateway"
    assert [o.value.request_id for o in outs if o.topic == t.USAGE] == ["b"], "the hit's saving is still counted"
    assert await on_routed(d, [refused(new)]) == [], "a redelivered refusal gets no second answer"


async def test_refused_spend_joins_a_twin_in_flight_but_never_leads_one() -> None:
    d = deduper(Settings(semantic_task_types=("faq",), semantic_verifier="features", audit_rate=1.0),
                semantic=False)
    first, second = await route(*(ask(r, "Is there an ATM fee?") for r in ("x", "y")))
    lonely = [refused(first), refused(second)]
    assert [type(x) for x in await d.handle(requests=[(r, 0) for r in lonely])] == [Refusal, Refusal], \
        "with no twin in flight nothing is free: neither leads a call for the other"
    leader, follower, paying = await route(*(ask(r, "Is there a card fee?") for r in ("l", "f", "p")))
    assert [type(x) for x in await d.handle(requests=[(leader, 0)])] == [Dispatch]
    held = await d.handle(requests=[(refused(follower), 0), (paying, 0)])
    assert [type(x) for x in held] == [Hold, Hold]
    released = await d.handle(answers=[(answer(leader), 0)])
    served = {x.routed.request.id: x.response.source for x in released if isinstance(x, Answer)}
    assert served == {"f": "coalesced", "p": "coalesced"}
    audited = {x.request.request_id for x in released if isinstance(x, Audit)}
    assert audited == {"p"}, "no audit is bought for a request whose spend is refused"


async def test_a_refused_follower_is_refused_when_its_leader_fails_or_is_late() -> None:
    d = deduper(Settings(coalesce_timeout_s=0.0, semantic_verifier="features"), semantic=False)
    leader, follower, late = await route(*(ask(r, "Is there a wire fee?") for r in ("l", "f", "g")))
    await on_routed(d, [leader])
    await on_routed(d, [refused(follower)])
    failed = LLMResponse(request_id="l", tenant="acme", source="error", responded_at=time.time(),
                         error={"code": "provider_error", "message": "down"})  # type: ignore[arg-type]
    outs = await on_responses(d, [(failed, 0)])
    assert [r.request_id for r in refusals(outs)] == ["f"] and t.DISPATCH not in {o.topic for o in outs}
    other_leader = (await route(ask("m", "Is there a wire fee?")))[0]
    await on_routed(d, [other_leader])
    await on_routed(d, [refused(late)])
    expired = outs_for(d.expire_waiters(now=time.time() + 1))
    assert [r.request_id for r in refusals(expired)] == ["g"] and t.DISPATCH not in {o.topic for o in expired}
    assert await on_routed(d, [refused(late)]) == [], "refused once, answered once"


async def test_a_refused_semantic_hit_is_served_without_an_audit() -> None:
    s = Space()
    q = s.direction()
    d = await answered_clusters(s, q)
    decisions = await d.handle(requests=[(refused(cluster_routed("new", "a reworded question", vector=q)), 0)])
    assert [(x.response.source, x.response.content) for x in decisions if isinstance(x, Answer)] == \
        [("cache_semantic", "Answer A.")]
    assert not [x for x in decisions if isinstance(x, Audit)], "the audit would buy the baseline's answer"


async def test_the_gateway_never_calls_a_model_for_refused_spend() -> None:
    provider = CountingProvider()
    gateway = Gateway({"simulated": provider}, MemoryCompleted())
    routed = (await route(ask("a", "Is there an overdraft fee?")))[0]
    routed = refused(routed.model_copy(update={"route": routed.route.model_copy(update={"provider": "simulated"})}))
    [result] = await gateway.handle([routed])
    assert result.response is not None and result.response.error is not None
    assert result.response.error.code == "budget_exceeded" and result.usage is None
    assert sum(provider.calls.values()) == 0


async def test_a_refused_near_miss_waits_for_no_free_label() -> None:
    """A near miss's free label compares the cached candidate with the fresh answer: a refused request gets none,
    so it is not remembered (the control, not refused, is)."""
    s = Space()
    q = s.direction()
    settings = CLUSTER_SETTINGS.model_copy(update={"semantic_answer_clusters": False})  # the verifier rejects all
    labels = []
    for free_only in (True, False):
        d = await answered_clusters(s, q, settings)
        asked = cluster_routed("new", "a reworded question", vector=q)
        [decision] = await d.handle(requests=[(refused(asked) if free_only else asked, 0)])
        assert isinstance(decision, Refusal if free_only else Dispatch)
        labels.append(len(d.audits._near))
    assert labels[0] == 0 and labels[1] > 0
