"""What start made is frozen out of full collections while services run, and thawed when the last block ends."""

from __future__ import annotations

import gc
import weakref

import pytest

from frugalstream.runtime.heap import startup_heap_frozen
from frugalstream.runtime.settings import Settings
from tests.unit.test_runtime_hardening import kafka  # noqa: F401  (the fixture: a fake broker for the entry's client)


class Made:
    """A tracked object standing for what a service makes at start."""


def _collected(obj: object) -> bool:
    """Whether the collector still walks `obj` (frozen objects are out of every generation)."""
    return any(o is obj for o in gc.get_objects())


def test_the_heap_as_it_stands_is_frozen_for_the_block_and_thawed_after() -> None:
    made = Made()
    assert _collected(made)
    with startup_heap_frozen():
        assert gc.get_freeze_count() > 0
        assert not _collected(made)
        later = Made()
        assert _collected(later)  # what requests make is still collected
    assert gc.get_freeze_count() == 0
    assert _collected(made)


def test_only_the_outermost_block_thaws() -> None:
    with startup_heap_frozen():
        with startup_heap_frozen():  # a second set of services in the same process (dev mode, tests)
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_garbage_made_while_starting_is_freed_not_frozen() -> None:
    made = Made()
    made.cycle = made  # type: ignore[attr-defined]  # only a collection frees a cycle
    gone = weakref.ref(made)
    del made
    with startup_heap_frozen():
        assert gone() is None


@pytest.mark.usefixtures("kafka")
async def test_the_http_entry_runs_with_its_start_frozen() -> None:
    from frugalstream.http_entry.server import http_entry

    async with http_entry(Settings(kafka_idempotent=False), host="127.0.0.1", port=0) as running:
        assert gc.get_freeze_count() > 0
        assert not any(o is running.entry for o in gc.get_objects())
    assert gc.get_freeze_count() == 0
