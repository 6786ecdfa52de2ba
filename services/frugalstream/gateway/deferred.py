"""Which dispatched requests can wait for a provider batch, and until when.

A request is deferrable when its producer said it can wait (`latency_class` `within_1h` / `within_24h`, or a
`deadline`) and its answer is due far enough ahead (`min_lead_s`) for a batch to be worth trying: a batch is
billed at half price but finishes when the provider gets to it. Whatever happens to the batch, an answer due at
`answer_by` is fetched interactively `fallback_margin_s` before it (see `batch_runner`).

The due time is bounded: a producer's `created_at` far in the future (a skewed clock, a careless producer)
cannot make a request wait longer than its class allows from when the gateway first saw it.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugalstream.schemas import LLMRequest, RoutedRequest

WINDOW_S = {"within_1h": 3600.0, "within_24h": 86400.0}
MAX_WINDOW_S = max(WINDOW_S.values())


@dataclass(frozen=True)
class DeferPolicy:
    gather_s: float = 60.0  # an open job is submitted this long after its first member joined
    max_requests: int = 1000  # ... or once it has this many members
    max_job_bytes: int = 800_000  # ... or when one more member would not fit one job record
    poll_interval_s: float = 30.0
    min_lead_s: float = 900.0  # a request due sooner than this goes interactive at once
    fallback_margin_s: float = 120.0  # a member still unanswered this long before it is due goes interactive


def answer_by(request: LLMRequest, seen_at: float) -> float | None:
    """When the answer is due, or None for an interactive request."""
    due: list[float] = []
    if request.deadline is not None:
        due.append(min(request.deadline, seen_at + MAX_WINDOW_S))
    window = WINDOW_S.get(request.latency_class)
    if window is not None:
        start = min(request.created_at or seen_at, seen_at)  # never later than when we saw it
        due.append(start + window)
    return min(due) if due else None


def may_wait(request: LLMRequest) -> bool:
    """Its producer said it can wait (a latency class or a deadline): it is not an interactive request."""
    return answer_by(request, 0.0) is not None


def deferrable(routed: RoutedRequest, now: float, policy: DeferPolicy, providers: frozenset[str]) -> float | None:
    """The due time of a request that goes into a batch job, or None when it is answered interactively now."""
    if routed.route.provider not in providers:
        return None
    due = answer_by(routed.request, now)
    if due is None or due - now < max(policy.min_lead_s, policy.fallback_margin_s):
        return None
    return due
