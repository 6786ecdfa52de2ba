"""The summarizer's knobs, shared by the planner, the pack and batch runners and the orchestrator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SummarizerConfig:
    pack_tokens: int = 3_000  # input tokens of the items in one packed call
    pack_items: int = 20
    chunk_calls: int = 8  # calls run concurrently and published together
    batch_min_deadline_s: int = 86_400  # a job that may wait this long goes through the batch API
    handler_budget_s: float = 120.0  # well under max_poll_interval (300 s)
    batch_poll_s: float = 30.0
