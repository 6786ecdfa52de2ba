"""Shared base of every topic contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def wire_bytes(value: BaseModel) -> int:
    """Its size as the publisher measures it: UTF-8 bytes of its JSON, not characters (a CJK character is three)."""
    return len(value.model_dump_json().encode())


class Contract(BaseModel):
    """Strict on unknown fields so a producer's typo fails loudly instead of being dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
