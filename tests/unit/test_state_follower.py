"""A control topic's follower never steps back: after the start-up read, the consumer's second pass over the
topic skips every record that read applied, so a restarted service keeps the latest budget throughout."""

from __future__ import annotations

from frugalstream.llm.budgets import BudgetBook
from frugalstream.runtime.state_topics import StateFollower
from frugalstream.schemas import BudgetState
from tests.unit.test_accounting_hardening import T0, state


def test_a_record_at_or_below_the_last_applied_offset_of_its_partition_is_skipped() -> None:
    seen: list[str] = []
    follower = StateFollower("llm.budgets", BudgetState, lambda s: seen.append(s.status))
    follower.applied = {0: 5}  # what the start-up read applied
    for offset, status in ((3, "ok"), (5, "near"), (6, "over")):
        follower.apply(state("b", status, "refuse"), 0, offset)
    follower.apply(state("c", "ok", "none"), 1, 0)  # another partition keeps its own place
    assert seen == ["over", "ok"]
    assert follower.applied == {0: 6, 1: 0}


def test_the_second_pass_after_a_restart_never_reverts_a_refusing_budget() -> None:
    book = BudgetBook(clock=lambda: T0)
    follower = StateFollower("llm.budgets", BudgetState, book.update)
    topic = [state("acme/*/day", "ok", "refuse"), state("acme/*/day", "over", "refuse")]  # offsets 0 and 1
    for value in topic:  # the start-up read, as `preload` applies it
        book.update(value)
    follower.applied = {0: 1}
    verdicts = []
    for offset, value in enumerate(topic):  # the consumer reads the topic again from its start
        follower.apply(value, 0, offset)
        verdicts.append(book.verdict("acme", {}))
    assert all(v is not None and v.status == "over" for v in verdicts)
