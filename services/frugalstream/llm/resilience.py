"""Retries, circuit breakers and model fallbacks around provider calls.

Pure asyncio logic with an injectable `sleep`, clock and RNG, so it is tested without waiting. The gateway
runs inside a Kafka handler, where a long sleep stalls a partition and risks a rebalance; so waits are
bounded (`max_retry_after_s`, `max_total_sleep_s`) and a longer rate limit is *surfaced* on
`FinalProviderError.retry_after_s` / `.rate_limited`, letting the service pause the partition instead.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from frugalstream.llm.providers.base import Completion, ErrorKind, Provider, ProviderError

CircuitState = Literal["closed", "open", "half_open"]
Sleep = Callable[[float], Awaitable[None]]

# Failures that say something about the provider's health; a 400 says something about the request.
DEFAULT_TRIP_KINDS: frozenset[ErrorKind] = frozenset({"timeout", "server", "connection", "malformed", "rate_limited"})


@dataclass(frozen=True)
class RetryPolicy:
    """Per-model retries with full-jitter exponential backoff (AWS style: uniform(0, min(cap, base·2^n))).

    `attempts` counts the first call. A provider's Retry-After is honoured exactly when it is at most
    `max_retry_after_s`; a longer one ends retries on that model instead of blocking the handler.
    """

    attempts: int = 3
    base_delay_s: float = 0.25
    max_delay_s: float = 4.0
    max_retry_after_s: float = 10.0
    max_total_sleep_s: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0 or self.max_retry_after_s < 0 or self.max_total_sleep_s < 0:
            raise ValueError("delays must be >= 0")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Jittered delay before retry number `retry` (0 = the first retry)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2.0 ** min(retry, 62)))
        return rng.uniform(0.0, ceiling)

    def delay_s(self, error: ProviderError, retry: int, rng: random.Random) -> float | None:
        """How long to wait before retrying after `error`, or None when waiting here is not worth it."""
        if error.retry_after_s is not None:
            return error.retry_after_s if error.retry_after_s <= self.max_retry_after_s else None
        return self.backoff_s(retry, rng)


class CircuitBreaker:
    """Closed → open when, within `window_s`, there are at least `failure_threshold` failures and they are at
    least `min_failure_ratio` of the outcomes (so a busy model with rare errors stays closed). After
    `cooldown_s` one probe is let through (half-open): success closes, failure reopens. A probe that never
    reports (its task was cancelled) expires after another `cooldown_s`, so it cannot stay half-open.

    Outcomes are kept in one-second buckets, so memory is bounded by the window, not the request rate.
    asyncio-only: no locks, every method runs synchronously between awaits.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        window_s: float = 30.0,
        cooldown_s: float = 15.0,
        min_failure_ratio: float = 0.5,
        trip_kinds: frozenset[ErrorKind] = DEFAULT_TRIP_KINDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.cooldown_s = cooldown_s
        self.min_failure_ratio = min_failure_ratio
        self.trip_kinds = trip_kinds
        self._clock = clock
        self._state: CircuitState = "closed"
        self._buckets: deque[list[int]] = deque()  # [second, failures, successes]
        self._opened_at = 0.0
        self._probe_at: float | None = None

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state, self._probe_at = "half_open", None
        return self._state

    def allow(self) -> bool:
        """May a call go out now? In half-open this hands out the single probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        if self._probe_at is None or now - self._probe_at >= self.cooldown_s:
            self._probe_at = now
            return True
        return False

    def record_success(self) -> None:
        if self._state == "closed":
            self._count(self._clock(), success=True)
        else:
            self._state, self._probe_at = "closed", None
            self._buckets.clear()

    def record_failure(self) -> None:
        now = self._clock()
        if self.state == "half_open":
            self._open(now)
            return
        if self._state == "open":  # a late failure from a call started before opening
            return
        self._count(now, success=False)
        failures = sum(b[1] for b in self._buckets)
        total = failures + sum(b[2] for b in self._buckets)
        if failures >= self.failure_threshold and failures >= self.min_failure_ratio * total:
            self._open(now)

    def record_error(self, error: ProviderError) -> None:
        """Health failures count; request failures (4xx) prove the endpoint is up, so they count as success."""
        if error.kind in self.trip_kinds:
            self.record_failure()
        else:
            self.record_success()

    def _count(self, now: float, *, success: bool) -> None:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        self._buckets[-1][2 if success else 1] += 1
        while self._buckets and second - self._buckets[0][0] >= self.window_s:
            self._buckets.popleft()

    def _open(self, now: float) -> None:
        self._state, self._opened_at, self._probe_at = "open", now, None
        self._buckets.clear()


class BreakerRegistry:
    """One breaker per (provider, model): one model's outage must not stop its fallbacks."""

    def __init__(self, factory: Callable[[], CircuitBreaker] = CircuitBreaker) -> None:
        self._factory = factory
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def get(self, provider: str, model: str) -> CircuitBreaker:
        key = (provider, model)
        if (breaker := self._breakers.get(key)) is None:
            breaker = self._breakers[key] = self._factory()
        return breaker

    def states(self) -> dict[tuple[str, str], CircuitState]:
        """For metrics and health endpoints."""
        return {key: b.state for key, b in self._breakers.items()}


class Attempt(NamedTuple):
    """One failed try (or a skip for an open circuit); a plain tuple, so it serialises and compares simply."""

    model: str
    kind: ErrorKind
    status: int | None


class FinalProviderError(Exception):
    """Every model in the fallback chain failed or was skipped.

    `retry_after_s` is the last wait a provider asked for; with `rate_limited` it lets the service pause
    the partition and redeliver later instead of answering with an error. `retryable` is False when some
    model failed for a reason a later redelivery would not fix (e.g. a 400).
    """

    def __init__(self, reason: str, attempts: Sequence[Attempt], *, retry_after_s: float | None = None,
                 retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = list(attempts)
        self.retry_after_s = retry_after_s
        self.retryable = retryable

    @property
    def rate_limited(self) -> bool:
        return any(a.kind == "rate_limited" for a in self.attempts)

    @property
    def kind(self) -> ErrorKind:
        """The most telling kind: circuit_open only if nothing was actually tried, else the last real failure."""
        real = [a.kind for a in self.attempts if a.kind != "circuit_open"]
        return real[-1] if real else "circuit_open"


def _summarise(attempts: Sequence[Attempt]) -> str:
    counts = Counter(attempts)
    parts = [f"{a.model} {a.kind}{f'/{a.status}' if a.status else ''}{f' x{n}' if n > 1 else ''}"
             for a, n in counts.items()]
    return "all models failed: " + "; ".join(parts)


async def call_with_fallbacks(
    providers_for_model: Callable[[str], Provider],
    models: Sequence[str],
    call: Callable[[Provider, str], Awaitable[Completion]],
    *,
    policy: RetryPolicy,
    breakers: BreakerRegistry,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> Completion:
    """Try `models` in order: each up to `policy.attempts` times, skipping models whose circuit is open.

    `call(provider, model)` performs one request (the caller closes over messages and parameters). Only
    `ProviderError` is handled; anything else (a bug, cancellation) propagates untouched.
    """
    if not models:
        raise FinalProviderError("no models to try", [])
    rng = rng or random.Random()
    attempts: list[Attempt] = []
    retry_after: float | None = None
    slept = 0.0
    retryable = True
    last_error: ProviderError | None = None

    def note(attempt: Attempt) -> None:
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)

    for model in dict.fromkeys(models):  # a model listed twice is tried once
        provider = providers_for_model(model)
        breaker = breakers.get(provider.name, model)
        for n in range(policy.attempts):
            if not breaker.allow():
                note(Attempt(model, "circuit_open", None))
                break
            try:
                completion = await call(provider, model)
            except ProviderError as exc:
                last_error = exc
                breaker.record_error(exc)
                note(Attempt(model, exc.kind, exc.status))
                if exc.retry_after_s is not None:
                    retry_after = exc.retry_after_s
                if not exc.retryable:
                    retryable = False
                    break
                if n + 1 >= policy.attempts:
                    break
                delay = policy.delay_s(exc, n, rng)
                if delay is None or slept + delay > policy.max_total_sleep_s:
                    break
                slept += delay
                await sleep(delay)
            else:
                breaker.record_success()
                return completion
    raise FinalProviderError(_summarise(attempts), attempts, retry_after_s=retry_after,
                             retryable=retryable) from last_error
