"""Dedupe through the real stage when a publish fails: nothing it decided is remembered until its outputs are
acknowledged, and a request is released from `llm.dedupe.waiting` only once what replaces its waiting record
(its dispatch, its answer) is on the broker.

The stage's promise (runtime/stage.py): a batch whose publish fails is redelivered; outputs may repeat, nothing
is lost. A crash is a new `DedupeService` rebuilt from what the broker acknowledged (`Broker.log`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from frugalstream.dedupe import rebuild
from frugalstream.dedupe.app import DedupeService
from frugalstream.dedupe.results import identity
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Out
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMResponse, RoutedRequest
from frugalstream.schemas import topics as t
from tests.unit.test_dedupe import SETTINGS, answer, ask, deduper, route
from tests.unit.test_stage import FakeRecord


class Broker(Publisher):
    """Keeps the dedupe handler (`subscriber`) and the acknowledged outputs (`log`). The next `fail_next`
    publishes fail; with `partial`, a failed publish still lands its tombstones (sends are concurrent)."""

    def __init__(self, settings: Settings, log: list[Out] | None = None) -> None:
        super().__init__(None, settings)  # type: ignore[arg-type]
        self.settings = settings
        self.log: list[Out] = [] if log is None else log
        self.handlers: dict[str, Any] = {}
        self.fail_next = 0
        self.partial = False

    def subscriber(self, *topics: str, **_options: Any) -> Any:
        def register(handler: Any) -> Any:
            self.handlers.update(dict.fromkeys(topics, handler))
            return handler
        return register

    async def publish_all(self, outs: Sequence[Out], *, service: str = "publisher") -> None:
        if not outs:
            return
        if self.fail_next > 0:
            self.fail_next -= 1
            if self.partial:
                self.log.extend(o for o in outs if o.value is None)
            raise ConnectionError("broker did not acknowledge")
        self.log.extend(outs)

    async def deliver(self, topic: str, values: Sequence[BaseModel], offset: int = 0) -> None:
        """One batch of `topic` on partition 0, as the consumer hands it to the handler (and again on a NACK)."""
        name = self.settings.topic(topic)
        raw = [FakeRecord(name, 0, offset + i, None, v.model_dump_json().encode()) for i, v in enumerate(values)]
        await self.handlers[name](SimpleNamespace(raw_message=raw, consumer=None))

    async def read_compacted(self, _s: Settings, name: str, _m: type, parts: set[int]) -> list[tuple[Any, int]]:
        latest: dict[str | None, tuple[Any, int] | None] = {}
        for o in self.log:
            if o.topic == name and (o.partition or 0) in parts:
                latest[o.key] = None if o.value is None else (o.value, o.partition or 0)
        return [v for v in latest.values() if v is not None]

    async def answered_since_commit(self, _s: Settings, _parts: set[int]) -> list[tuple[str, str]]:
        """Every answer on the log: these tests never commit what the crashed owner published."""
        return [(o.value.tenant, o.value.request_id) for o in self.log
                if o.topic == t.RESPONSES and isinstance(o.value, LLMResponse)]

    def answers_to(self, rid: str) -> list[LLMResponse]:
        return [o.value for o in self.log
                if o.topic == t.RESPONSES and isinstance(o.value, LLMResponse) and o.value.request_id == rid]

    def dispatched(self, rid: str) -> list[RoutedRequest]:
        return [o.value for o in self.log
                if o.topic == t.DISPATCH and isinstance(o.value, RoutedRequest) and o.value.request.id == rid]


def instance(settings: Settings = SETTINGS, log: list[Out] | None = None,
             monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[DedupeService, Broker]:
    """A dedupe instance on its broker; with `monkeypatch`, its rebuild reads that broker's log."""
    service, broker = DedupeService(settings, deduper(settings, semantic=False)), Broker(settings, log)
    service.register(broker, broker)  # type: ignore[arg-type]
    if monkeypatch is not None:
        monkeypatch.setattr(rebuild, "read_compacted", broker.read_compacted)
        monkeypatch.setattr(rebuild, "answered_since_commit", broker.answered_since_commit)
    return service, broker


# -- A failed publish is redelivered: what was decided is decided again ---------------------------------------


async def test_a_cache_hit_whose_publish_failed_is_answered_on_redelivery() -> None:
    _, broker = instance()
    first, again = await route(ask("a", "What are your opening hours?"), ask("b", "What are your opening hours?"))
    await broker.deliver(t.ROUTED, [first])
    await broker.deliver(t.RESPONSES, [answer(first)])
    broker.fail_next = 1
    with pytest.raises(ConnectionError):
        await broker.deliver(t.ROUTED, [again], offset=1)  # NACK: not committed
    await broker.deliver(t.ROUTED, [again], offset=1)  # the redelivery
    assert [a.source for a in broker.answers_to("b")] == ["cache_exact"], "b is answered, once"
    await broker.deliver(t.ROUTED, [again], offset=1)
    assert len(broker.answers_to("b")) == 1, "once acknowledged, the answer is remembered"


async def test_a_coalesced_follower_is_answered_when_its_leaders_answer_is_redelivered() -> None:
    _, broker = instance()
    leader, follower = await route(ask("a", "Is there an overdraft fee?"), ask("b", "Is there an overdraft fee?"))
    await broker.deliver(t.ROUTED, [leader])
    await broker.deliver(t.ROUTED, [follower], offset=1)
    assert [o.topic for o in broker.log] == [t.DISPATCH, t.DEDUPE_WAITING]
    broker.fail_next = 1
    with pytest.raises(ConnectionError):
        await broker.deliver(t.RESPONSES, [answer(leader)])
    await broker.deliver(t.RESPONSES, [answer(leader)])  # the redelivery of the leader's answer
    assert [a.source for a in broker.answers_to("b")] == ["coalesced"], "the follower gets the leader's answer"
    await broker.deliver(t.RESPONSES, [answer(leader)])
    assert len(broker.answers_to("b")) == 1, "once acknowledged, the release is remembered"


# -- A release never outruns the record that replaces the waiting one ------------------------------------------


async def test_a_follower_released_by_the_sweeper_is_not_lost_by_a_crash_after_a_partial_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = SETTINGS.model_copy(update={"coalesce_timeout_s": 0.0})
    old, broker = instance(settings)
    leader, follower = await route(ask("a", "Is there an ATM fee?"), ask("b", "Is there an ATM fee?"))
    await broker.deliver(t.ROUTED, [leader])
    await broker.deliver(t.ROUTED, [follower], offset=1)  # held, committed
    broker.fail_next, broker.partial = 1, True  # a tombstone sent with the dispatch would land, the dispatch not
    await old.sweep_waiters_once()
    assert old.unpublished, "kept for the next tick ... which a crash never runs"

    new, _ = instance(settings, broker.log, monkeypatch)  # the restarted owner of partition 0
    await new.rebuilder.load({0})
    assert broker.dispatched("b") or new.logic.coalescing.waiter(identity(follower)) is not None, \
        "follower b is neither dispatched nor waiting anywhere: it never gets an answer"


async def test_a_follower_released_by_its_leaders_answer_is_not_lost_by_a_crash_after_a_partial_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, broker = instance()
    leader, follower = await route(ask("a", "Can I freeze my card?"), ask("b", "Can I freeze my card?"))
    await broker.deliver(t.ROUTED, [leader])
    await broker.deliver(t.ROUTED, [follower], offset=1)
    broker.fail_next, broker.partial = 1, True
    with pytest.raises(ConnectionError):
        await broker.deliver(t.RESPONSES, [answer(leader)])  # and the instance dies before the redelivery

    new, _ = instance(log=broker.log, monkeypatch=monkeypatch)
    await new.rebuilder.load({0})
    assert broker.dispatched("b") or new.logic.coalescing.waiter(identity(follower)) is not None, \
        "follower b was released, but neither answered nor dispatched: it never gets an answer"


async def test_a_waiting_request_resumed_by_a_rebuild_is_not_lost_by_a_crash_after_a_partial_publish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, broker = instance()
    leader, follower = await route(ask("a", "Do you have a lounge?"), ask("b", "Do you have a lounge?"))
    await broker.deliver(t.ROUTED, [leader])
    await broker.deliver(t.ROUTED, [follower], offset=1)  # b waits; the owner dies before a's answer comes

    restarted, its_broker = instance(log=broker.log, monkeypatch=monkeypatch)
    its_broker.fail_next, its_broker.partial = 1, True
    with pytest.raises(ConnectionError):
        await restarted.rebuilder.load({0})  # b no longer has a leader: dispatched and released; dies meanwhile

    last, _ = instance(log=broker.log, monkeypatch=monkeypatch)
    await last.rebuilder.load({0})
    assert broker.dispatched("b") or last.logic.coalescing.waiter(identity(follower)) is not None, \
        "b was released by the rebuild, but never dispatched: it never gets an answer"


# -- After a crash, what the crashed owner answered is not answered again --------------------------------------


async def test_a_request_answered_before_a_crash_gets_no_second_answer_from_the_next_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, broker = instance()
    first, again = await route(ask("a", "When are you closed?"), ask("b", "When are you closed?"))
    await broker.deliver(t.ROUTED, [first])
    await broker.deliver(t.RESPONSES, [answer(first)])
    await broker.deliver(t.ROUTED, [again], offset=1)  # answered from cache, then the owner dies uncommitted
    assert len(broker.answers_to("b")) == 1

    new, new_broker = instance(log=broker.log, monkeypatch=monkeypatch)
    await new.rebuilder.load({0})
    await new_broker.deliver(t.ROUTED, [again], offset=1)  # b is redelivered to the new owner
    assert len(broker.answers_to("b")) == 1, "b's answer since the last commit is known: no second answer"
