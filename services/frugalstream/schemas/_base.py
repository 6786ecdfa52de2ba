"""Shared base of every topic contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: How far ahead of a reader's clock a control record (`llm.budgets`, `llm.thresholds`) may be stamped. Books keep
#: the latest stamp, so a record stamped in milliseconds or decades ahead would otherwise outrank every later one.
CLOCK_SKEW_S = 3600.0


def wire_bytes(value: BaseModel) -> int:
    """Its size as the publisher measures it: UTF-8 bytes of its JSON, not characters (a CJK character is three)."""
    return len(value.model_dump_json().encode())


class Contract(BaseModel):
    """Strict on unknown fields so a producer's typo fails loudly instead of being dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
