"""Proportions with uncertainty: Wilson score intervals, on plain and on weighted samples.

Audits are samples, so every rate derived from them is reported with its 95% interval and its sample size.
Labels sampled at different rates (a 5% audit of hits, every free near-miss label) are combined with weights
1/rate; their interval uses Kish's effective sample size, so many cheap labels cannot feign certainty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes/n; (0, 1) when there is no sample."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Proportion:
    """A rate with its 95% interval; `n` is the (effective) sample size the interval rests on."""

    n: float
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, successes: float, n: float) -> Proportion:
        low, high = wilson(successes, n)
        return cls(n, successes / n if n > 0 else 0.0, low, high)


def weighted(labels: Iterable[tuple[bool, float]]) -> Proportion:
    """(success, weight) labels: the weighted rate, with the Wilson interval at the effective sample size."""
    total = square = hits = 0.0
    for ok, w in labels:
        total += w
        square += w * w
        hits += w if ok else 0.0
    if total <= 0:
        return Proportion(0.0, 0.0, 0.0, 1.0)
    n_eff = total * total / square
    p = hits / total
    low, high = wilson(p * n_eff, n_eff)
    return Proportion(n_eff, p, low, high)
