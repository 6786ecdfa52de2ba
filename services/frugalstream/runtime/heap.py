"""Keeps the objects made at start out of Python's full garbage collections.

Every service of a process shares one event loop, and a full (oldest generation) collection stops it while it
walks every tracked object. After start that is mostly what start made and never frees: modules, the framework,
pydantic schemas, the models' tokenizers. At 50 req/s with all services in one process such collections came
every 5-6 s and stopped the loop for 58-181 ms each, the slowest 1% of every stage's latency. Frozen
(`gc.freeze`), they are skipped; what requests make is still collected.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_depth = 0


@contextlib.contextmanager
def startup_heap_frozen() -> Iterator[None]:
    """Freezes the heap as it stands for the block; the outermost block thaws it again on exit, so that a
    process which starts and stops services many times (a test session) leaves nothing frozen for good.

    A collection first, so garbage made while starting is freed and not frozen with the rest."""
    global _depth
    gc.collect()
    gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
