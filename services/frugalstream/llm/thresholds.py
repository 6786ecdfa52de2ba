"""Live thresholds: the latest `llm.thresholds` value per (tenant, task type, knob), as a service last read them.

The classifier and dedupe read the compacted topic whole and consult this book on every decision, so a change
takes effect without a restart. Keys carry the tenant: a change for one tenant never touches another's
decisions (an unknown tenant falls back to the shipped settings).

The latest change is the one stamped last. The writer (the audit controller) stamps each change of a key past
the one it replaces (`stamped`), so a clock that stepped back cannot lose a tightening; a reader refuses a
stamp more than `CLOCK_SKEW_S` ahead of its own clock, so one record stamped in milliseconds cannot outrank
every later change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from frugalstream.schemas._base import CLOCK_SKEW_S
from frugalstream.schemas.audits import Knob, ThresholdChange

log = structlog.get_logger("frugalstream.llm.thresholds")
#: How far past the change it replaces a change is stamped when the writer's clock is behind.
STAMP_STEP_S = 0.001


@dataclass
class ThresholdBook:
    changes: dict[tuple[str, str, str], ThresholdChange] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.time, repr=False)
    tenants: set[str] = field(default_factory=set, repr=False)  # the tenants holding a threshold of their own

    def update(self, change: ThresholdChange) -> None:
        if change.changed_at > self.clock() + CLOCK_SKEW_S:
            log.warning("threshold_change_from_the_future_ignored", tenant=change.tenant, knob=change.knob,
                        task_type=change.task_type, changed_at=change.changed_at)
            return
        key = (change.tenant, change.task_type, change.knob)
        current = self.changes.get(key)
        if current is None or change.changed_at >= current.changed_at:
            self.changes[key] = change
            self.tenants.add(change.tenant)

    def stamped(self, change: ThresholdChange) -> ThresholdChange:
        """`change`, stamped after the change of its key this book holds (for the writer, before publishing)."""
        current = self.changes.get((change.tenant, change.task_type, change.knob))
        if current is None or change.changed_at > current.changed_at:
            return change
        return change.model_copy(update={"changed_at": current.changed_at + STAMP_STEP_S})

    def get(self, tenant: str, task_type: str | None, knob: Knob) -> float | None:
        change = self.changes.get((tenant, task_type or "", knob))
        return change.value if change is not None else None


def threshold_key(tenant: str, task_type: str, knob: Knob) -> str:
    """The compacted topic's key: one latest value per (tenant, task type, knob)."""
    return f"{tenant}/{task_type}/{knob}"
