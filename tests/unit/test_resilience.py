"""Retry policy, circuit breaker and fallback chain, with a fake clock and a fake sleep (no real waiting)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from frugalstream.llm.providers import Completion, ProviderError, parse_retry_after
from frugalstream.llm.resilience import (
    Attempt,
    BreakerRegistry,
    CircuitBreaker,
    FinalProviderError,
    RetryPolicy,
    call_with_fallbacks,
)
from frugalstream.schemas import SamplingParams, TokenUsage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


class ScriptedProvider:
    """Per model, a script of outcomes: a ProviderError to raise, or None to answer."""

    def __init__(self, name: str, scripts: dict[str, Sequence[ProviderError | None]]) -> None:
        self.name = name
        self.scripts = {m: list(s) for m, s in scripts.items()}
        self.calls: list[str] = []

    async def complete(self, *, model: str, **_: Any) -> Completion:
        self.calls.append(model)
        outcome = self.scripts[model].pop(0) if self.scripts.get(model) else None
        if outcome is not None:
            raise outcome
        return Completion(content=f"answer from {model}", model=model, usage=TokenUsage(), finish_reason="stop",
                          latency_ms=1.0, simulated=True)

    async def aclose(self) -> None:
        return None


def state(breaker: CircuitBreaker) -> str:
    """Read through a function so mypy does not narrow the property across state changes."""
    return breaker.state


def server(status: int = 503) -> ProviderError:
    return ProviderError("boom", kind="server", status=status)


async def run(provider: ScriptedProvider, models: Sequence[str], *, policy: RetryPolicy | None = None,
              breakers: BreakerRegistry | None = None, sleep: FakeSleep | None = None,
              on_attempt: Any = None) -> Completion:
    return await call_with_fallbacks(
        lambda model: provider, models,
        lambda p, model: p.complete(model=model, messages=(), sampling=SamplingParams()),
        policy=policy or RetryPolicy(attempts=3), breakers=breakers or BreakerRegistry(),
        sleep=sleep or FakeSleep(), rng=random.Random(42), on_attempt=on_attempt,
    )


# --- RetryPolicy --------------------------------------------------------------------------------------

def test_backoff_is_full_jitter_within_exponential_bounds() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(7)
    for retry, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (50, 4.0), (500, 4.0)]:
        samples = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > 0.8 * ceiling  # full jitter actually uses the range
    again = [RetryPolicy().backoff_s(2, random.Random(3)) for _ in range(2)]
    assert again[0] == again[1]


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retry_after_s=5.0)
    rng = random.Random(0)
    assert policy.delay_s(ProviderError("x", kind="rate_limited", retry_after_s=2.5), 0, rng) == 2.5
    assert policy.delay_s(ProviderError("x", kind="rate_limited", retry_after_s=60), 0, rng) is None
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_retry_after_dates_and_rate_limit_reset_headers() -> None:
    date = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 27 <= (parse_retry_after(httpx.Headers({"retry-after": date})) or 0) <= 31
    openai = httpx.Headers({"x-ratelimit-remaining-requests": "99", "x-ratelimit-reset-requests": "8.64s",
                            "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"})
    assert parse_retry_after(openai) == 90.0
    assert parse_retry_after(httpx.Headers({"x-ratelimit-reset-tokens": "20ms"})) == pytest.approx(0.02)
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    reset = (datetime.now(UTC) + timedelta(seconds=12)).isoformat().replace("+00:00", "Z")
    anthropic = httpx.Headers({"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": reset})
    assert 10 <= (parse_retry_after(anthropic) or 0) <= 12.5
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None


# --- CircuitBreaker -----------------------------------------------------------------------------------

def test_breaker_opens_after_threshold_within_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, window_s=10, cooldown_s=5, clock=clock)
    breaker.record_failure()
    clock.now += 11  # the first failure leaves the window
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) == "closed" and breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open" and not breaker.allow()


def test_breaker_ignores_rare_failures_among_many_successes() -> None:
    breaker = CircuitBreaker(failure_threshold=3, min_failure_ratio=0.5, clock=Clock())
    for _ in range(20):
        breaker.record_success()
    for _ in range(5):
        breaker.record_failure()
    assert state(breaker) == "closed"


def test_client_errors_do_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1, clock=Clock())
    breaker.record_error(ProviderError("bad request", kind="client", status=400))
    assert state(breaker) == "closed"
    breaker.record_error(ProviderError("down", kind="connection"))
    assert state(breaker) == "open"


def test_half_open_probe_closes_or_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure()
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert state(breaker) == "half_open"
    assert breaker.allow() and not breaker.allow()  # exactly one probe
    breaker.record_failure()
    assert state(breaker) == "open" and not breaker.allow()
    clock.now += 5
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed" and breaker.allow() and breaker.allow()


def test_lost_probe_expires() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, clock=clock)
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()  # this probe's task is cancelled and never reports
    clock.now += 4
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


# --- call_with_fallbacks ------------------------------------------------------------------------------

async def test_retries_then_succeeds_on_same_model() -> None:
    provider = ScriptedProvider("p", {"small": [server(), server(502)]})
    sleep = FakeSleep()
    done = await run(provider, ["small", "large"], sleep=sleep)
    assert done.model == "small" and provider.calls == ["small"] * 3
    assert len(sleep.calls) == 2 and all(0 <= s <= 0.5 for s in sleep.calls)


async def test_fallbacks_are_used_in_order() -> None:
    provider = ScriptedProvider("p", {"small": [server()] * 3, "mid": [server()] * 3, "large": []})
    seen: list[Attempt] = []
    done = await run(provider, ["small", "mid", "large"], on_attempt=seen.append)
    assert done.model == "large"
    assert provider.calls == ["small"] * 3 + ["mid"] * 3 + ["large"]
    assert seen == [("small", "server", 503)] * 3 + [("mid", "server", 503)] * 3


async def test_final_error_lists_every_attempt() -> None:
    provider = ScriptedProvider("p", {"small": [server()] * 2, "large": [ProviderError("bad", kind="client",
                                                                                        status=400)]})
    with pytest.raises(FinalProviderError) as info:
        await run(provider, ["small", "large"], policy=RetryPolicy(attempts=2))
    err = info.value
    assert err.attempts == [("small", "server", 503), ("small", "server", 503), ("large", "client", 400)]
    assert not err.retryable and err.kind == "client" and not err.rate_limited
    assert "small server/503 x2" in err.reason and isinstance(err.__cause__, ProviderError)


async def test_non_retryable_error_moves_on_without_sleeping() -> None:
    provider = ScriptedProvider("p", {"small": [ProviderError("bad", kind="malformed")], "large": []})
    sleep = FakeSleep()
    done = await run(provider, ["small", "large"], sleep=sleep)
    assert done.model == "large" and sleep.calls == [] and provider.calls == ["small", "large"]


async def test_open_circuits_are_skipped() -> None:
    clock = Clock()
    breakers = BreakerRegistry(lambda: CircuitBreaker(failure_threshold=2, cooldown_s=30, clock=clock))
    provider = ScriptedProvider("p", {"small": [server()] * 10, "large": []})
    assert (await run(provider, ["small", "large"], breakers=breakers)).model == "large"
    # The breaker opened after the second failure, which ended the retries on "small" early.
    assert provider.calls == ["small", "small", "large"]
    provider.calls.clear()
    assert (await run(provider, ["small", "large"], breakers=breakers)).model == "large"
    assert provider.calls == ["large"] and breakers.states()[("p", "small")] == "open"

    breakers.get("p", "large").record_failure()
    breakers.get("p", "large").record_failure()
    with pytest.raises(FinalProviderError) as info:
        await run(provider, ["small", "large"], breakers=breakers)
    assert info.value.attempts == [("small", "circuit_open", None), ("large", "circuit_open", None)]
    assert info.value.kind == "circuit_open" and info.value.retryable


async def test_rate_limit_is_honoured_or_surfaced() -> None:
    limited = ProviderError("429", kind="rate_limited", status=429, retry_after_s=2.0)
    provider = ScriptedProvider("p", {"small": [limited]})
    sleep = FakeSleep()
    assert (await run(provider, ["small"], sleep=sleep)).model == "small"
    assert sleep.calls == [2.0]

    long_wait = ProviderError("429", kind="rate_limited", status=429, retry_after_s=120.0)
    provider = ScriptedProvider("p", {"small": [long_wait], "large": [long_wait]})
    sleep = FakeSleep()
    with pytest.raises(FinalProviderError) as info:
        await run(provider, ["small", "large"], sleep=sleep, policy=RetryPolicy(max_retry_after_s=10))
    assert sleep.calls == [] and provider.calls == ["small", "large"]
    assert info.value.rate_limited and info.value.retry_after_s == 120.0 and info.value.retryable


async def test_total_sleep_budget_and_edge_cases() -> None:
    provider = ScriptedProvider("p", {"m": [ProviderError("x", kind="timeout", retry_after_s=3.0)] * 5})
    sleep = FakeSleep()
    with pytest.raises(FinalProviderError):
        await run(provider, ["m", "m"], sleep=sleep, policy=RetryPolicy(attempts=5, max_total_sleep_s=7))
    assert sleep.calls == [3.0, 3.0] and provider.calls == ["m"] * 3  # duplicates tried once

    with pytest.raises(FinalProviderError, match="no models"):
        await run(provider, [])

    class Boom(ScriptedProvider):
        async def complete(self, *, model: str, **_: Any) -> Completion:
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await run(Boom("p", {}), ["m"])
