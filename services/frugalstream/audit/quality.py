"""A routing threshold that holds *quality retained* against always-baseline, not routed-down acceptance.

Quality retained at threshold t is E[quality served] / E[quality of the baseline]: a request scored under t is
served the cheap answer (quality qc), the others the baseline's (qr). Routed-down and routed-up audits both
carry (score, qc, qr) with weight 1/sampling rate, so together they stand for all traffic and say what any t
would have retained (a ratio estimator; its 95% interval by linearization, the weights' spread included). A cheap
answer that is right where the baseline's is wrong counts for the cheap path: "the weak model failed 8% of the
time" is a different, stricter quantity than "95% of the quality kept".

Moves need evidence, and never happen before `min_sample` labels:
- the interval at the current threshold lies under the target (the bound is broken): tighten at once, to the
  most permissive threshold whose lower bound holds the target (none: route nothing down);
- a more permissive threshold's lower bound holds the target: loosen to the most permissive such one, walking
  from the current threshold and stopping at the first whose estimate misses the target (Learn-then-Test's
  fixed sequence);
- otherwise (the target inside the interval, nothing looser proven): stay. So a threshold already near the
  target stays put, and one far too strict loosens only as far as the labels can prove.

A point of the curve routes down exactly the labels it counted: its threshold is just past a label's score but
never past the next label's (`<` excludes that one), so a loosened threshold never admits a label it did not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from frugalstream.llm.audit_stats import Z95

STEP = 1e-4


@dataclass(frozen=True)
class Graded:
    """One routing label: the escalation score, the cheap answer's and the baseline's quality, the weight."""

    score: float
    cheap: float
    baseline: float
    weight: float = 1.0


@dataclass(frozen=True)
class Retained:
    """Quality retained at `threshold` with its 95% interval; `n` labels, `down` of them routed down there."""

    threshold: float
    rate: float
    low: float
    high: float
    n: int
    down: int


def past(score: float, following: float | None) -> float:
    """The threshold just past `score` (routed down: score < t) that stays at or under the next distinct score,
    so it takes exactly the labels scored up to `score`."""
    return score + STEP if following is None else min(score + STEP, (score + following) / 2)


def finite(labels: list[Graded]) -> list[Graded]:
    """Labels with a finite score and weight: a NaN compares false with everything, so it would mis-sort the
    others and never join a tie."""
    return [g for g in labels if math.isfinite(g.score) and math.isfinite(g.weight)]


def curve(labels: list[Graded]) -> list[Retained]:
    """Quality retained at every distinct threshold (just past each label's score, see `past`, plus 0.0), least
    permissive first, in one pass over the labels sorted by score: running weighted sums, O(n log n)."""
    ordered = sorted(finite(labels), key=lambda g: g.score)
    if not ordered:
        return []
    w = [g.weight for g in ordered]
    # a_i = baseline (routed up) or cheap (routed down); b_i = baseline. R = sum(w a) / sum(w b).
    sum_b = sum(wi * g.baseline for wi, g in zip(w, ordered, strict=True))
    sum_bb = sum(wi * wi * g.baseline ** 2 for wi, g in zip(w, ordered, strict=True))
    sum_a, sum_aa, sum_ab = sum_b, sum_bb, sum_bb
    pseudo = Z95 * Z95 / 2 * sum(w) / len(w)  # Agresti-Coull-like: no loss seen is not a loss ruled out
    out = [_at(0.0, sum_a, sum_aa, sum_ab, sum_b, sum_bb, len(ordered), 0, 0.0)]
    i = 0
    while i < len(ordered):
        score, j = ordered[i].score, i + 1
        while j < len(ordered) and ordered[j].score == score:  # ties move together; j > i, so this always advances
            j += 1
        for g, wi in zip(ordered[i:j], w[i:j], strict=True):
            sum_a += wi * (g.cheap - g.baseline)
            sum_aa += wi * wi * (g.cheap ** 2 - g.baseline ** 2)
            sum_ab += wi * wi * (g.cheap - g.baseline) * g.baseline
        i = j
        following = ordered[i].score if i < len(ordered) else None
        out.append(_at(past(score, following), sum_a, sum_aa, sum_ab, sum_b, sum_bb, len(ordered), i, pseudo))
    return out


def _at(threshold: float, sa: float, saa: float, sab: float, sb: float, sbb: float, n: int, down: int,
        pseudo: float) -> Retained:
    if sb <= 0:
        return Retained(threshold, 1.0, 0.0, 1.0, n, down)
    r = sa / sb
    var = max(saa - 2 * r * sab + r * r * sbb, 0.0) / (sb * sb)  # sum w^2 (a - r b)^2 / (sum w b)^2
    half = Z95 * math.sqrt(var)
    low, high = (sa - pseudo) / sb - half, (sa + pseudo) / sb + half  # a pseudo loss, a pseudo gain
    return Retained(threshold, r, max(low, 0.0), min(high, 1.0), n, down)


def at(points: list[Retained], threshold: float) -> Retained:
    """The point of the curve in force at `threshold` (labels scored under it are routed down)."""
    best = points[0]
    for p in points:
        if p.threshold <= threshold:
            best = p
    return Retained(threshold, best.rate, best.low, best.high, best.n, best.down)


def decide(labels: list[Graded], current: float, target: float, min_sample: int,
           bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, str, Retained] | None:
    """(new threshold, reason, its estimate), or None: no move (too few labels, the target inside the interval
    at the current threshold and no looser threshold whose lower bound holds it)."""
    if len(labels) < min_sample:
        return None
    points = curve(labels)
    now = at(points, current)
    if now.high < target:
        holding = [p for p in points if p.threshold <= current and p.low >= target]
        safe = holding[-1] if holding else Retained(bounds[0], 1.0, 1.0, 1.0, now.n, 0)
        return _clip(safe, bounds), "bound_broken", safe
    chosen: Retained | None = None
    for p in points:
        if p.threshold <= current:
            continue
        if p.rate < target:
            break  # a fixed sequence: nothing past a threshold that misses the target is considered
        if p.low >= target:
            chosen = p
    if chosen is not None:
        return _clip(chosen, bounds), "evidence", chosen
    return None


def _clip(p: Retained, bounds: tuple[float, float]) -> float:
    return min(max(p.threshold, bounds[0]), bounds[1])
