"""Shared base of every topic contract."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Contract(BaseModel):
    """Strict on unknown fields so a producer's typo fails loudly instead of being dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
