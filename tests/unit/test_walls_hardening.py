"""The classifier's walls against what the first walls missed: a trim that dropped the question, a reply topic in
another tenant's narrower namespace or colliding with a DLQ, an invalid request whose timestamp overflowed, and
tool-call text counted on the event loop."""
from __future__ import annotations

import json
import threading

import pytest

from frugalstream.classifier.app import ClassifierService
from frugalstream.classifier.logic import Classifier
from frugalstream.classifier.trimming import trim_to_budget
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.records import Out, Record
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import ChatMessage, LLMRequest, ToolCall
from frugalstream.schemas import topics as t
from tests.unit.test_policy_walls import CATALOG, ask, errors_of, routed_of, run

COUNTER = TokenCounter()


def codes(outs: list[Out]) -> list[str]:
    return [code for _, code, _ in errors_of(outs)]


# --- trimming: the last user turn ---------------------------------------------------------------------------

def test_trimming_keeps_the_last_user_turn_when_a_tool_exchange_follows_it() -> None:
    call = ToolCall(id="c1", name="search", arguments='{"q": "x"}')
    msgs = [
        ChatMessage(role="system", content="You are helpful."),
        ChatMessage(role="user", content="old question " + "word " * 200),
        ChatMessage(role="assistant", content="old answer " + "word " * 200),
        ChatMessage(role="user", content="LAST USER QUESTION " + "word " * 300),
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", tool_call_id="c1", content="result " * 1_800),
    ]
    out = trim_to_budget(msgs, 2_000, COUNTER, "gpt-4o")
    assert any(m.role == "user" and m.content.startswith("LAST USER QUESTION") for m in out.messages), \
        [m.role for m in out.messages]


def test_trimming_keeps_the_last_user_turn_when_an_assistant_prefill_follows_it() -> None:
    msgs = [
        ChatMessage(role="user", content="LAST USER QUESTION " + "word " * 300),
        ChatMessage(role="assistant", content="prefill " + "word " * 1_900),
    ]
    out = trim_to_budget(msgs, 2_000, COUNTER, "gpt-4o")
    assert any(m.role == "user" for m in out.messages), [m.role for m in out.messages]


async def test_classifier_never_routes_a_request_without_its_last_user_turn() -> None:
    call = ToolCall(id="c1", name="search", arguments='{"q": "x"}')
    req = LLMRequest(id="r1", tenant="acme", task_hint="faq", messages=(
        ChatMessage(role="user", content="LAST USER QUESTION " + "word " * 300),
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", tool_call_id="c1", content="result " * 1_900),
    ))
    [routed] = routed_of(await run(Settings(), req))
    assert any(m.role == "user" for m in routed.request.messages), [m.role for m in routed.request.messages]


# --- reply topics -------------------------------------------------------------------------------------------

async def test_reply_topic_under_another_tenants_default_prefix_is_refused() -> None:
    # Tenant "acme.eu" exists; its default reply prefix is "acme.eu.". Tenant "acme"'s explicit "acme." covers it.
    settings = Settings(tenants={"acme": TenantPolicy(reply_topic_prefixes=("acme.",)), "acme.eu": TenantPolicy()})
    outs = await run(settings, ask(tenant="acme", reply_topic="acme.eu.replies"))
    assert routed_of(outs) == [] and codes(outs) == ["reply_topic_denied"], [o.topic for o in outs]


@pytest.mark.parametrize("settings", [Settings(), Settings(tenants={"acme": TenantPolicy()})],
                         ids=["no-policies", "parent-only"])
async def test_a_default_grant_never_reaches_an_unconfigured_dotted_tenants_namespace(settings: Settings) -> None:
    """Tenant `acme.eu` needs no policy to exist: its callers wait on `acme.eu.*` by default, so `acme`'s
    default grant may not reach there even when the settings never name `acme.eu`."""
    outs = await run(settings, ask(tenant="acme", reply_topic="acme.eu.replies"))
    assert routed_of(outs) == [] and codes(outs) == ["reply_topic_denied"], [o.topic for o in outs]
    assert routed_of(await run(settings, ask(tenant="acme.eu", reply_topic="acme.eu.replies")))
    assert routed_of(await run(settings, ask(tenant="acme", reply_topic="acme.replies")))
    granted = Settings(tenants={"acme": TenantPolicy(reply_topic_prefixes=("acme.replies.",))})
    assert routed_of(await run(granted, ask(tenant="acme", reply_topic="acme.replies.v2")))


async def test_a_tenants_own_and_shared_reply_namespaces_stay_open() -> None:
    """The control: the narrower namespace wins only when it is another tenant's; a prefix granted to both is
    shared as configured."""
    settings = Settings(tenants={"acme": TenantPolicy(), "acme.eu": TenantPolicy(),
                                 "beta": TenantPolicy(reply_topic_prefixes=("team.replies.",)),
                                 "gamma": TenantPolicy(reply_topic_prefixes=("team.replies.",))})
    assert routed_of(await run(settings, ask(tenant="acme", reply_topic="acme.replies")))
    assert routed_of(await run(settings, ask(tenant="acme.eu", reply_topic="acme.eu.replies")))
    assert routed_of(await run(settings, ask(tenant="beta", reply_topic="team.replies.b")))


@pytest.mark.parametrize(("tenant", "topic"), [
    ("acme", "llm.requests_dlq"), ("acme", "llm_requests_dlq"), ("acme", "llm.responses_dlq"),
    ("llm", "llm.requests_dlq"),  # tenant "llm" with its default prefix `llm.`, as in test_policy_walls
])
async def test_reply_topic_colliding_with_a_dlq_is_refused(tenant: str, topic: str) -> None:
    # The project refuses `llm_budgets` because it collides with llm.budgets in Kafka; a DLQ's colliding form
    # passes.
    settings = Settings(tenants={"acme": TenantPolicy(reply_topic_prefixes=("",)), "llm": TenantPolicy()})
    outs = await run(settings, ask(tenant=tenant, reply_topic=topic))
    assert codes(outs) == ["reply_topic_denied"], [o.topic for o in outs]


# --- invalid requests ---------------------------------------------------------------------------------------

def _invalid_outs(raw: bytes, settings: Settings) -> list[Out]:
    exc: Exception
    try:
        LLMRequest.model_validate_json(raw)
    except Exception as e:
        exc = e
    else:
        raise AssertionError("expected invalid")
    svc = ClassifierService(settings, Classifier(settings, TokenCounter(), catalog=CATALOG))
    rec = Record(topic="llm.requests", partition=0, offset=1, key=None, value=raw, headers=())
    return svc._on_invalid(rec, exc)


def test_invalid_request_with_a_huge_integer_created_at_still_gets_its_terminal_answer() -> None:
    raw = ('{"id": "bad-1", "tenant": "acme", "created_at": 1' + "0" * 400
           + ', "messages": [{"role": "robot", "content": "x"}]}').encode()
    outs = _invalid_outs(raw, Settings())
    assert [(o.topic, o.key) for o in outs] == [(t.RESPONSES, "bad-1")]


# --- CPU work off the loop: text outside `content` -------------------------------------------------------------

class ThreadRecordingCounter(TokenCounter):
    def __init__(self) -> None:
        self.threads: set[int] = set()

    def count_message(self, message: ChatMessage, model: str) -> int:
        self.threads.add(threading.get_ident())
        return super().count_message(message, model)


async def test_long_tool_call_arguments_are_counted_off_the_event_loop() -> None:
    loop_thread = threading.get_ident()
    counter = ThreadRecordingCounter()
    big = json.dumps({"blob": "word " * 40_000})
    call = ToolCall(id="c1", name="f", arguments=big)
    req = LLMRequest(id="r1", tenant="acme", messages=(
        ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", tool_call_id="c1", content="ok"), ChatMessage(role="user", content="and?")))
    await run(Settings(), req, counter=counter)
    assert counter.threads and loop_thread not in counter.threads
