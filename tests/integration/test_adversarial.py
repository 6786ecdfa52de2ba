"""Issue 12's hard walls, attacked through Kafka as a hostile tenant and a careless producer would.

One regression test per attack. Each asserts only what a caller can observe: the terminal messages on
`llm.responses` (read with a quiet period, so a late second answer fails), reply topics, dead letters and
cost events. Every test that shows something is *not* served from cache also shows, as a control, that the
same flow *is* served from cache when it should be: a test must not pass because caching is off.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from frugalstream.classifier.app import ClassifierService
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, SamplingParams, ToolCall
from frugalstream.schemas import topics as t
from frugalstream.tools.embedded_broker import EmbeddedBroker
from tests.integration.adversary import (
    Attacker,
    ask,
    collect_terminal,
    cost_events,
    dead_letters,
    only,
    read_raw,
    wait_until,
)
from tests.integration.conftest import PARTITIONS, PipelineFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CACHED = {"cache_exact", "cache_semantic", "coalesced"}


def with_policies(settings: Settings, **tenants: TenantPolicy) -> Settings:
    """Settings is a frozen pydantic-settings model: `model_copy(update=...)` is how tests vary it."""
    return settings.model_copy(update={"tenants": {**settings.tenants, **tenants}})


async def simulated_content(request: LLMRequest, model: str) -> str:
    """What the simulated provider answers to exactly this request's messages on this model."""
    completion = await SimulatedProvider(latency_scale=0.0).complete(
        model=model, messages=request.messages, sampling=request.sampling, max_tokens=request.max_tokens,
        tools=request.tools, response_format=request.response_format)
    return completion.content


# 1 ------------------------------------------------------------------------------------------------------------
async def test_reused_request_id_across_tenants_each_gets_its_own_answer_on_its_own_reply_topic(
    pipeline: PipelineFactory, integration_settings: Settings, embedded_broker: EmbeddedBroker,
) -> None:
    settings = integration_settings
    await embedded_broker.create_topics({settings.topic(x): PARTITIONS for x in ("alpha.replies", "beta.replies")})
    questions = {"alpha": "What is the capital of France?", "beta": "How many legs does a spider have?"}
    in_flight = [ask("dup-1", questions[x], tenant=x, reply_topic=f"{x}.replies") for x in ("alpha", "beta")]
    answered_a = ask("dup-2", "Which planet is closest to the sun?", tenant="alpha", reply_topic="alpha.replies")
    answered_b = ask("dup-2", "What colour is a ripe banana?", tenant="beta", reply_topic="beta.replies")
    async with pipeline(), Attacker(settings) as attacker:
        await attacker.request(*in_flight)  # B reuses A's id while A is in flight
        await attacker.request(answered_a)
        await collect_terminal(settings, {("alpha", "dup-2")}, quiet_s=0)
        await attacker.request(answered_b)  # ...and an id A has already been answered for
        want = {("alpha", "dup-1"), ("beta", "dup-1"), ("alpha", "dup-2"), ("beta", "dup-2")}
        got = await collect_terminal(settings, want, quiet_s=3)
        replies = {x: await collect_terminal(settings, {(x, "dup-1"), (x, "dup-2")}, topic=f"{x}.replies",
                                             timeout_s=20, quiet_s=1) for x in ("alpha", "beta")}
        events = await cost_events(settings, expected=4, timeout_s=20)

    for req in (*in_flight, answered_a, answered_b):
        mine = only(got, req.tenant, req.id)
        assert mine.source == "llm" and mine.ok, f"{req.tenant}/{req.id} was answered with {mine.source}"
        assert mine.content == await simulated_content(req, mine.model or ""), (
            f"{req.tenant}/{req.id} got an answer computed for another prompt")
        # Its own reply topic carries exactly its own answer, and never the other tenant's.
        assert only(replies[req.tenant], req.tenant, req.id) == mine
    for tenant, answers in replies.items():
        assert {k[0] for k in answers} == {tenant}, f"{tenant}'s reply topic carried another tenant's answer"
    assert only(got, "alpha", "dup-1").content != only(got, "beta", "dup-1").content
    paid = {(e["data"]["tenant"], e["data"]["request_id"]) for e in events if e["data"]["stage"] == "gateway"}
    assert paid == want, "each tenant's call is priced under its own identity (no usage id collapses two)"


# 2 ------------------------------------------------------------------------------------------------------------
def weather(rid: str, result: str) -> LLMRequest:
    call = ToolCall(id="call-1", name="get_weather", arguments='{"city": "Oslo"}')
    return LLMRequest(id=rid, tenant="acme", tools=({"type": "function", "function": {"name": "get_weather"}},),
                      messages=(ChatMessage(role="user", content="What is the weather in Oslo right now?"),
                                ChatMessage(role="assistant", tool_calls=(call,)),
                                ChatMessage(role="tool", tool_call_id="call-1", content=result)))


async def test_turns_after_the_last_user_message_are_part_of_the_cache_key(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    snow, sunny, snow_again = weather("w-snow", "snow"), weather("w-sunny", "sunny"), weather("w-snow-2", "snow")
    async with pipeline(), Attacker(settings) as attacker:
        got = {}
        for req in (snow, sunny, snow_again):  # one at a time: each can only be served by the cache
            await attacker.request(req)
            got.update(await collect_terminal(settings, {("acme", req.id)}, quiet_s=0))
        got = await collect_terminal(settings, set(got), quiet_s=2)
    first, second, control = (only(got, "acme", r.id) for r in (snow, sunny, snow_again))
    assert first.source == "llm"
    assert second.source == "llm", f"the 'sunny' turn was served the 'snow' answer from {second.source}"
    assert second.content != first.content
    assert second.content == await simulated_content(sunny, second.model or "")
    assert control.source == "cache_exact" and control.content == first.content, "the identical turn still hits"


# 3 ------------------------------------------------------------------------------------------------------------
async def test_shared_scope_is_granted_by_policy_never_by_the_request(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = with_policies(integration_settings, alpha=TenantPolicy(shared_scopes=("kb",)),
                             beta=TenantPolicy(shared_scopes=("kb",)))
    question = "How do I rotate the API key of my account?"
    seed = ask("kb-1", question, tenant="alpha", cache={"shared_scope": "kb"})
    thief = ask("kb-2", question, tenant="mallory", cache={"shared_scope": "kb"})
    thief_writes = ask("kb-3", "What is the admin password of the kb?", tenant="mallory",
                       cache={"shared_scope": "kb"})
    granted = ask("kb-4", question, tenant="beta", cache={"shared_scope": "kb"})
    async with pipeline(settings=settings), Attacker(settings) as attacker:
        await attacker.request(seed)
        await collect_terminal(settings, {("alpha", seed.id)}, quiet_s=0)
        await attacker.request(thief, thief_writes, granted)
        got = await collect_terminal(settings, {("alpha", seed.id), ("mallory", thief.id),
                                                ("mallory", thief_writes.id), ("beta", granted.id)}, quiet_s=2)
        # mallory's denied write must not have landed in kb either: a granted tenant asking it is a miss.
        probe = ask("kb-5", "What is the admin password of the kb?", tenant="beta", cache={"shared_scope": "kb"})
        await attacker.request(probe)
        got.update(await collect_terminal(settings, {("beta", probe.id)}, quiet_s=1))
    stored = only(got, "alpha", seed.id)
    assert stored.source == "llm" and stored.content
    for rid in (thief.id, thief_writes.id):
        denied = only(got, "mallory", rid)
        assert denied.source == "error" and denied.error is not None, f"mallory read kb: {denied.source}"
        assert denied.error.code == "shared_scope_denied"
        assert denied.content is None
    hit = only(got, "beta", granted.id)
    assert hit.source == "cache_exact" and hit.content == stored.content, "a granted tenant shares kb's hits"
    assert only(got, "beta", probe.id).source == "llm", "a denied request stored nothing in the shared scope"


# 4 ------------------------------------------------------------------------------------------------------------
async def test_a_5mb_value_is_dead_lettered_once_capped_and_its_partition_keeps_flowing(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    filler = "lorem ipsum dolor sit amet " * (5_000_000 // 27)
    huge = json.dumps({"id": "big-1", "tenant": "acme",
                       "messages": [{"role": "user", "content": filler}]}).encode()
    assert len(huge) > 5_000_000
    after = ask("after-big", "What are your business hours?")
    async with pipeline(), Attacker(settings, max_request_size=8 * 1024 * 1024) as attacker:
        partition, offset = await attacker.raw(t.REQUESTS, huge, key=b"same-key")
        await attacker.request(after, key=b"same-key")  # same key: the same partition, behind the 5 MB value
        got = await collect_terminal(settings, {("acme", after.id)}, timeout_s=60, quiet_s=2)
        letters = await dead_letters(settings, t.REQUESTS, timeout_s=5)
    assert only(got, "acme", after.id).source == "llm", "the partition behind a 5 MB value keeps flowing"
    mine = [d for d in letters if (d.partition, d.offset) == (partition, offset)]
    assert len(mine) == 1, f"the 5 MB value was dead-lettered {len(mine)} times"
    letter = mine[0]
    assert letter.truncated and letter.value_size == len(huge)
    assert letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert huge.startswith(base64.b64decode(letter.value_b64))
    assert len(letter.model_dump_json().encode()) <= settings.max_message_bytes
    for answer in got.get(("acme", "big-1"), []):  # if it is answered at all, once and with a clear error
        assert answer.error is not None and answer.error.code in {"too_large", "invalid_request"}
    assert len(got.get(("acme", "big-1"), [])) <= 1


async def test_a_valid_request_near_the_size_limit_gets_one_terminal_message_and_does_not_wedge_its_scope(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    base = ask("near-limit", "x")
    room = settings.max_message_bytes - len(base.model_dump_json().encode()) - 2_000
    text = ("the quick brown fox jumps over the lazy dog " * (room // 44 + 1))[:room] + " Summarize this?"
    near = ask("near-limit", text)
    assert settings.max_message_bytes - 3_000 < len(near.model_dump_json().encode()) < settings.max_message_bytes
    later = ask("near-limit-next", "What are your business hours?")  # same tenant, same scope, same partitions
    async with pipeline(), Attacker(settings) as attacker:
        await attacker.request(near)
        await attacker.request(later, key=near.id.encode())
        got = await collect_terminal(settings, {("acme", near.id), ("acme", later.id)}, timeout_s=90, quiet_s=3)
    big = only(got, "acme", near.id)
    assert big.ok or (big.error is not None and big.error.code == "too_large"), big.error
    assert only(got, "acme", later.id).source == "llm", "a request after the near-limit one is answered"


# 5 ------------------------------------------------------------------------------------------------------------
def reply_copy_of(value: bytes | None, rid: str) -> bool:
    """Whether a record is the copy of an answer that `response_outs` writes to a reply topic."""
    try:
        return value is not None and LLMResponse.model_validate_json(value).request_id == rid
    except ValueError:
        return False


FORBIDDEN_REPLY_TOPICS = (t.CACHE, t.BUDGETS, t.DEDUPE_WAITING, t.RESPONSES, t.GATEWAY_COMPLETED,
                          t.dlq_topic(t.REQUESTS), "beta.replies")


async def test_reply_topic_naming_an_internal_topic_or_another_tenant_is_denied_and_never_written(
    pipeline: PipelineFactory, integration_settings: Settings, embedded_broker: EmbeddedBroker,
) -> None:
    settings = integration_settings
    await embedded_broker.create_topics({settings.topic(x): PARTITIONS for x in ("acme.replies", "beta.replies")})
    attacks = [ask(f"rt-{i}", f"Question number {i} about shipping?", reply_topic=topic)
               for i, topic in enumerate(FORBIDDEN_REPLY_TOPICS)]
    allowed = ask("rt-ok", "Where is my parcel?", reply_topic="acme.replies")
    async with pipeline(), Attacker(settings) as attacker:
        await attacker.request(*attacks, allowed)
        want = {("acme", r.id) for r in (*attacks, allowed)}
        got = await collect_terminal(settings, want, quiet_s=3)
        written = await read_raw(settings, [settings.topic(x) for x in FORBIDDEN_REPLY_TOPICS if x != t.RESPONSES],
                                 timeout_s=4)
        own = await collect_terminal(settings, {("acme", allowed.id)}, topic="acme.replies", timeout_s=20, quiet_s=0)
    for req in attacks:
        denied = only(got, "acme", req.id)  # on llm.responses: one message, not a second copy via reply_topic
        assert denied.error is not None and denied.error.code == "reply_topic_denied", (
            f"reply_topic={req.reply_topic!r} answered with {denied.source}")
        leaked = [r for r in written if r.key == req.id.encode() or reply_copy_of(r.value, req.id)]
        assert not leaked, f"a request wrote to {req.reply_topic}: {[r.topic for r in leaked]}"
    assert only(got, "acme", allowed.id).ok, "the tenant's own prefix is granted by default"
    assert only(own, "acme", allowed.id) == only(got, "acme", allowed.id)


async def test_a_typo_in_a_reply_topic_under_the_tenants_prefix_does_not_wedge_the_gateway(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    typo = ask("typo-1", "Can I change my delivery address?", reply_topic="acme.replise")
    nxt = [ask(f"typo-next-{i}", f"Can I change my billing address, case {i}?") for i in range(3)]
    async with pipeline(), Attacker(settings) as attacker:
        await attacker.request(typo)
        await attacker.request(*nxt, key=typo.id.encode())
        got = await collect_terminal(settings, {("acme", r.id) for r in (typo, *nxt)}, timeout_s=90, quiet_s=2)
    first = only(got, "acme", typo.id)
    assert first.ok or (first.error is not None and first.error.code == "delivery_failed"), first.error
    for req in nxt:
        assert only(got, "acme", req.id).ok, "the tenant's next requests are answered"


# 6 ------------------------------------------------------------------------------------------------------------
UNPRICED = ("o3-pro", "claude-sonnet-4-5")


async def test_a_pin_to_an_unpriced_model_is_refused_by_default(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    catalog = PriceCatalog.load()
    assert not any(catalog.has(m) for m in UNPRICED), "the attack needs models the catalog lacks"
    pins = [ask(f"unpriced-{i}", "Write a haiku about invoices.", model=m) for i, m in enumerate(UNPRICED)]
    async with pipeline(), Attacker(settings) as attacker:
        await attacker.request(*pins)
        got = await collect_terminal(settings, {("acme", r.id) for r in pins}, quiet_s=2)
        events = await cost_events(settings, timeout_s=2)
    for req in pins:
        refused = only(got, "acme", req.id)
        assert refused.error is not None and refused.error.code == "unpriced_model", refused.source
    assert not [e for e in events if e["data"]["request_id"] in {r.id for r in pins}], "nothing was paid"


async def test_an_allowed_unpriced_pin_is_billed_with_price_unknown_and_a_refusing_budget_sees_it(
    pipeline: PipelineFactory, integration_settings: Settings, tmp_path: Path,
) -> None:
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"budgets": [
        {"tenant": "lavish", "period": "month", "limit_usd": 0.000001, "action": "refuse"}]}))
    settings = with_policies(integration_settings, lavish=TenantPolicy(allow_unpriced_models=True)).model_copy(
        update={"budgets_file": budgets})
    first = [ask(f"lavish-{i}", f"Write a haiku about invoice {i}.", tenant="lavish", model=m)
             for i, m in enumerate(UNPRICED)]
    second = ask("lavish-after", "Write a haiku about receipts.", tenant="lavish", model="o3-pro")
    async with pipeline(settings=settings) as running, Attacker(settings) as attacker:
        await attacker.request(*first)
        got = await collect_terminal(settings, {("lavish", r.id) for r in first}, quiet_s=1)
        events = await cost_events(settings, expected=len(first), timeout_s=30)
        classifier = running.service("classifier")
        assert isinstance(classifier, ClassifierService)

        def refused() -> bool:
            verdict = classifier.logic.budgets.verdict("lavish", {})
            return verdict is not None and verdict.status == "over"

        await wait_until(refused, 30, "the refusing budget to count the unpriced spend")
        await attacker.request(second)
        got.update(await collect_terminal(settings, {("lavish", second.id)}, quiet_s=1))
        letters = await dead_letters(settings, t.USAGE, timeout_s=2)
    for req in first:
        answer = only(got, "lavish", req.id)
        assert answer.source == "llm" and answer.model == req.model
    by_request = {e["data"]["request_id"]: e["data"] for e in events}
    for req in first:
        data = by_request.get(req.id)
        assert data is not None, f"the spend of {req.model} vanished (no cost event)"
        assert data["price_unknown"] is True and req.model in data["unpriced_models"]
        assert data["actual_cost_usd"] > 0, "unknown price is priced conservatively, never as free"
    assert not letters, "billed usage is never dead-lettered for a missing price"
    blocked = only(got, "lavish", second.id)
    assert blocked.error is not None and blocked.error.code == "budget_exceeded"


# 7 ------------------------------------------------------------------------------------------------------------
async def test_a_pin_is_never_served_another_models_answer(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    question = "What are your business hours on public holidays?"
    unpinned = ask("pin-0", question)  # faq: routed to gpt-4o-mini
    pinned = [ask(f"pin-{i}", question, model="gpt-4o") for i in (1, 2)]
    other = "What is your refund policy for damaged goods?"
    by_4o, by_41, by_4o_again = (ask("pin-3", other, model="gpt-4o"), ask("pin-4", other, model="gpt-4.1"),
                                 ask("pin-5", other, model="gpt-4o"))
    async with pipeline(), Attacker(settings) as attacker:
        # Back to back on one key: the pinned ones arrive while the unpinned one is in flight (coalescing).
        await attacker.request(unpinned, *pinned, key=b"pins")
        got = await collect_terminal(settings, {("acme", r.id) for r in (unpinned, *pinned)}, quiet_s=0)
        for req in (by_4o, by_41, by_4o_again):
            await attacker.request(req)
            got.update(await collect_terminal(settings, {("acme", req.id)}, quiet_s=0))
        got = await collect_terminal(settings, set(got), quiet_s=3)
    assert only(got, "acme", unpinned.id).model == "gpt-4o-mini"
    for req in pinned:
        answer = only(got, "acme", req.id)
        assert answer.ok and answer.model == "gpt-4o", f"pinned gpt-4o got {answer.model} via {answer.source}"
    assert only(got, "acme", by_4o.id).source == "llm"
    answer = only(got, "acme", by_41.id)
    assert answer.model == "gpt-4.1" and answer.source == "llm", f"gpt-4.1 pin got {answer.model} ({answer.source})"
    control = only(got, "acme", by_4o_again.id)
    assert control.source == "cache_exact" and control.model == "gpt-4o", "the same pin still hits the cache"


# 8 ------------------------------------------------------------------------------------------------------------
async def test_system_prompt_as_written_and_sampling_are_part_of_the_scope(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = with_policies(integration_settings, sampler=TenantPolicy(cache_sampled=True))
    q = "What are your business hours?"
    french = ask("sys-1", q, system="Answer ONLY in French.")
    folded = ask("sys-2", q, system="answer only in french")
    same = ask("sys-3", q, system="Answer ONLY in French.")
    hot = SamplingParams(temperature=1.0)
    sampled = [ask(f"temp-{i}", "Suggest a name for a coffee shop?", sampling=hot) for i in (1, 2)]
    opted = [ask(f"temp-opt-{i}", "Suggest a name for a coffee shop?", tenant="sampler", sampling=hot)
             for i in (1, 2)]
    async with pipeline(settings=settings), Attacker(settings) as attacker:
        got = {}
        for req in (french, folded, same, *sampled, *opted):  # one at a time: only the cache could serve them
            await attacker.request(req)
            got.update(await collect_terminal(settings, {(req.tenant, req.id)}, quiet_s=0))
        got = await collect_terminal(settings, set(got), quiet_s=2)
    assert only(got, "acme", french.id).source == "llm"
    assert only(got, "acme", folded.id).source == "llm", "a system prompt differing in case is another scope"
    assert only(got, "acme", same.id).source == "cache_exact", "the same system prompt still hits"
    assert only(got, "acme", sampled[1].id).source == "llm", "temperature 1.0 is not served from cache by default"
    assert only(got, "sampler", opted[1].id).source == "cache_exact", "a tenant that opts in is served from cache"


# 9 ------------------------------------------------------------------------------------------------------------
async def test_an_invalid_request_that_names_its_id_and_tenant_gets_a_terminal_error_and_a_dead_letter(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    settings = integration_settings
    user = [{"role": "user", "content": "hi"}]
    invalid = {
        "bad-empty": {"id": "bad-empty", "tenant": "acme", "messages": []},
        "bad-tokens": {"id": "bad-tokens", "tenant": "acme", "messages": user, "max_tokens": -5},
        "bad-role": {"id": "bad-role", "tenant": "acme", "messages": [{"role": "wizard", "content": "hi"}]},
        "bad-dotdot": {"id": "bad-dotdot", "tenant": "acme", "messages": user, "reply_topic": ".."},
    }
    anonymous = b'{"tenant": "acme", "messages": []}'  # no id: nobody to answer, only a dead letter
    after = ask("after-invalid", "What are your business hours?")
    async with pipeline(), Attacker(settings) as attacker:
        for body in invalid.values():
            await attacker.raw(t.REQUESTS, json.dumps(body).encode(), key=b"bad")
        await attacker.raw(t.REQUESTS, anonymous, key=b"bad")
        await attacker.request(after, key=b"bad")
        got = await collect_terminal(settings, {("acme", rid) for rid in (*invalid, after.id)}, quiet_s=2)
        letters = await dead_letters(settings, t.REQUESTS, expected=len(invalid) + 1, timeout_s=20)
    for rid in invalid:
        answer = only(got, "acme", rid)
        assert answer.source == "error" and answer.error is not None
        expected = {"invalid_request", "reply_topic_denied"} if rid == "bad-dotdot" else {"invalid_request"}
        assert answer.error.code in expected, answer.error.code
        assert "hi" not in answer.error.message.split(), "the error names fields, never echoes the prompt"
    assert only(got, "acme", after.id).source == "llm"
    lettered = [json.loads(base64.b64decode(d.value_b64)).get("id") for d in letters]
    assert sorted(x for x in lettered if x) == sorted(invalid) and lettered.count(None) == 1, "one letter each"


# 10 (issue 19) ------------------------------------------------------------------------------------------------
async def test_coalesced_followers_get_one_answer_and_no_second_one_after_the_coalescing_timeout(
    pipeline: PipelineFactory, integration_settings: Settings,
) -> None:
    """Followers answered by coalescing must be released for good: the reader listens past the coalescing
    timeout after the last first answer, so a follower re-dispatched when its wait expires fails here."""
    settings = integration_settings.model_copy(update={"coalesce_timeout_s": 2.0})
    same = [ask(f"co-{i}", "Can I return an opened item?") for i in range(5)]
    slow = lambda _name: SimulatedProvider(latency_scale=0.5)  # noqa: E731 - leaders stay in flight ~0.3 s
    async with pipeline(settings=settings, provider_factory=slow), Attacker(settings) as attacker:
        await attacker.request(*same, key=b"co")
        got = await collect_terminal(settings, {("acme", r.id) for r in same}, quiet_s=settings.coalesce_timeout_s + 3)
    answers = [only(got, "acme", r.id) for r in same]
    assert all(a.ok for a in answers)
    assert sum(a.source == "coalesced" for a in answers) >= 1, "control: the followers were coalesced"
    assert len({a.content for a in answers}) == 1
