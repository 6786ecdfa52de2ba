"""Live thresholds: the latest `llm.thresholds` value per (tenant, task type, knob), as a service last read them.

The classifier and dedupe read the compacted topic whole and consult this book on every decision, so a change
takes effect without a restart. Keys carry the tenant: a change for one tenant never touches another's
decisions (an unknown tenant falls back to the shipped settings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from frugalstream.schemas.audits import Knob, ThresholdChange


@dataclass
class ThresholdBook:
    changes: dict[tuple[str, str, str], ThresholdChange] = field(default_factory=dict)

    def update(self, change: ThresholdChange) -> None:
        key = (change.tenant, change.task_type, change.knob)
        current = self.changes.get(key)
        if current is None or change.changed_at >= current.changed_at:
            self.changes[key] = change

    def get(self, tenant: str, task_type: str | None, knob: Knob) -> float | None:
        change = self.changes.get((tenant, task_type or "", knob))
        return change.value if change is not None else None


def threshold_key(tenant: str, task_type: str, knob: Knob) -> str:
    """The compacted topic's key: one latest value per (tenant, task type, knob)."""
    return f"{tenant}/{task_type}/{knob}"
