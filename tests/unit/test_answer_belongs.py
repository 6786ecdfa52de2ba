"""An answer from cache or from a twin reaches only a request it answers: not one that differs in a slot value
(an order number, a name, a negation), in what the model reads beyond the words (a participant's name, a
program's case and layout, a superscript), nor a twin whose leader's id was reused for another question."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from frugalstream.dedupe.results import Answer, Dispatch, Hold, Store
from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.cache_keys import cache_keys, normalize_text
from frugalstream.llm.embedder import AsyncEmbedder, HashingEmbedder
from frugalstream.llm.verifier import slot_conflict
from frugalstream.schemas import CacheEntry, ChatMessage, LLMRequest
from tests.unit.test_answer_clusters import SETTINGS, RejectAll, Space, Vec, fill, routed
from tests.unit.test_dedupe import answer, deduper, route


def entry(rid: str, text: str, content: str) -> CacheEntry:
    r = routed(rid, text)
    return CacheEntry(keys=r.keys, request_id=rid, tenant="acme", content=content, model="gpt-4o-mini",
                      output_tokens=5, stored_at=1000.0)


@pytest.fixture
def index() -> Iterator[SemanticIndex]:
    idx = SemanticIndex(AsyncEmbedder(HashingEmbedder()), RejectAll(), semantic_policy(SETTINGS),
                        clock=lambda: 1000.0)
    yield idx
    idx.close()


def cluster_served(idx: SemanticIndex, cached: list[str], query: str) -> str | None:
    """`cached` questions share one answer, each close to the query's vector (the cluster is confident; the
    verifier rejects every pair): what the cluster path serves `query`, if anything."""
    s = Space()
    q = s.direction()
    items: list[tuple[CacheEntry, Vec]] = [(entry(f"a{i}", text, "Yes, it shipped yesterday."),
                                            s.near(q, 0.92 - 0.02 * i)) for i, text in enumerate(cached)]
    b = s.direction()
    items += [(entry(f"b{i}", f"Where is invoice copy {i}?", "In Billing."), s.near(b, 0.9)) for i in range(3)]
    fill(idx, items)
    hit = idx.match_vectors([routed("q", query)], q[None])[0]
    return None if hit is None else hit.entry.keys.lookup_text


ORDERS = ["Has order 1001 shipped yet?", "Has order 1002 shipped yet?", "Has order 1003 shipped yet?"]


def test_a_cluster_never_serves_a_question_about_another_order_number(index: SemanticIndex) -> None:
    assert cluster_served(index, ORDERS, "Has order 2044 shipped yet?") is None


def test_a_cluster_serves_a_rewording_from_the_member_with_the_same_slot(index: SemanticIndex) -> None:
    """The control: the same path serves a rewording, from the one member whose order number it names."""
    assert cluster_served(index, ORDERS, "Did order 1002 ship yet?") == "Has order 1002 shipped yet?"


@pytest.mark.parametrize(("cached", "query"), [
    (["Is Alice an admin?", "Is Carol an admin?", "Is Dave an admin?"], "Is Mallory an admin?"),
    (["Do you deliver to Paris?", "Do you deliver to Lyon?", "Can you deliver to Nice?"],
     "Do you deliver to Antarctica?"),
    (["Can I return an opened item?", "Can opened items be returned?", "May I return an item I opened?"],
     "Can I not return an opened item?"),
])
def test_a_cluster_never_serves_another_name_or_a_negation(index: SemanticIndex, cached: list[str],
                                                          query: str) -> None:
    assert cluster_served(index, cached, query) is None


def test_slot_conflict_names_its_reason() -> None:
    assert slot_conflict("Has order 2044 shipped?", "Has order 1001 shipped?") == "number_mismatch"
    assert slot_conflict("Is Mallory an admin?", "Is Alice an admin?") == "entity_mismatch"
    assert slot_conflict("Can I return it?", "Could I return it?") == ""  # "I" is no name
    assert slot_conflict("I lost my card. What now?", "I lost my card, what now") == "", "a sentence opens: no name"
    assert slot_conflict("Can I pay in GBP?", "Can I pay in USD?") == "entity_mismatch"


# --- what the exact key must tell apart ------------------------------------------------------------------------

def ask(rid: str, text: str, *, name: str | None = None) -> LLMRequest:
    return LLMRequest(id=rid, tenant="acme", messages=(ChatMessage(role="user", content=text, name=name),),
                      task_hint="faq")  # type: ignore[arg-type]


@pytest.mark.parametrize(("first", "second"), [
    ("What is 3²?", "What is 32?"),
    ("Compute 10!", "Compute 10"),
    ("What does this print?\nX = 1\nx = 2\nprint(X)", "What does this print?\nx = 1\nx = 2\nprint(x)"),
    ("Output?\nfor i in range(3):\n    x = i\n    print(x)", "Output?\nfor i in range(3):\n    x = i\nprint(x)"),
], ids=["superscript", "factorial", "identifier-case", "indentation"])
async def test_texts_the_model_reads_differently_never_share_an_answer(first: str, second: str) -> None:
    assert normalize_text(first) != normalize_text(second)
    d = deduper()
    a, b = await route(ask("a", first), ask("b", second))
    assert [type(x) for x in await d.handle(requests=[(a, 0)])] == [Dispatch]
    await d.handle(answers=[(answer(a, "The first one's answer."), 0)])
    assert [type(x) for x in await d.handle(requests=[(b, 0)])] == [Dispatch]


async def test_a_participants_name_is_part_of_what_is_asked() -> None:
    """`name` reaches the model: bob's "What is my name?" is neither alice's exact twin nor in her shard."""
    alice, bob, alice_again = await route(ask("a", "What is my name?", name="alice"),
                                          ask("b", "What is my name?", name="bob"),
                                          ask("c", "what is my name", name="alice"))
    assert alice.keys.prefix != bob.keys.prefix and alice.keys.exact != bob.keys.exact
    d = deduper()
    await d.handle(requests=[(alice, 0)])
    await d.handle(answers=[(answer(alice, "Your name is alice."), 0)])
    assert [type(x) for x in await d.handle(requests=[(bob, 0)])] == [Dispatch]
    assert [type(x) for x in await d.handle(requests=[(alice_again, 0)])] == [Answer], "the same asker is served"


def test_retyping_a_one_line_question_still_asks_it() -> None:
    assert normalize_text("  What are your HOURS?? ") == normalize_text("what are your hours")
    assert normalize_text("Ｈｅｌｌｏ ﬁne!") == "hello fine"
    plain = LLMRequest(id="x", tenant="acme", messages=(ChatMessage(role="user", content="Hi"),))
    assert cache_keys(plain, "small").exact == cache_keys(plain.model_copy(), "small").exact


# --- coalescing under a reused id -------------------------------------------------------------------------------

async def test_a_follower_never_takes_an_answer_to_another_question_under_its_leaders_id() -> None:
    """A producer re-sends id L with another question in another scope: both are paid, both answers come back
    as (acme, L). The follower of the first question takes only the first question's answer."""
    d = deduper()
    system = ChatMessage(role="system", content="You are a poet.")
    leader, follower, reused = await route(
        ask("L", "What are your opening hours?"), ask("F", "What are your opening hours?"),
        LLMRequest(id="L", tenant="acme", messages=(system, ChatMessage(role="user", content="A poem on cats.")),
                   task_hint="faq"))  # type: ignore[arg-type]
    assert [type(x) for x in await d.handle(requests=[(leader, 0), (follower, 0)])] == [Dispatch, Hold]
    assert [type(x) for x in await d.handle(requests=[(reused, 1)])] == [Dispatch]
    out = await d.handle(answers=[(answer(reused, "Whiskers soft as dawn."), 1)])
    assert not [x for x in out if isinstance(x, Answer) and x.routed.request.id == "F"]
    assert [x for x in out if isinstance(x, Dispatch) and x.routed.request.id == "F"], "it asks on its own"
    stored = [x.entry for x in out if isinstance(x, Store)]
    assert leader.embedding is not None and [e.embedding for e in stored] == [None], \
        "the poem is not indexed under the hours question's vector"
