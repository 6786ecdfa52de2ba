"""Thresholds that hold a target: per (tenant, task type, knob), move the threshold on labelled decisions.

A label is (score, accepted, weight): the decision's own score (verifier score for the semantic cache,
escalation score for routing), the judge's verdict, and 1/rate of the sampling that produced it. Labels do not
depend on the threshold in force, so every label ever seen (up to `window`) says what *any* threshold would
have done: `semantic_verify` serves a candidate when score >= t (and `answer_cluster` when the cluster model's
confidence is), `route_mid` routes down when score < t. The
target is a minimum acceptance among the decisions a threshold makes (a false-hit bound F is acceptance 1-F).

- A broken bound tightens at once: when the point estimate at the current threshold is below the target
  (at least one rejection seen), the threshold moves to the most permissive one whose 95% lower bound holds
  the target, or, with no such one, just past the worst rejected label.
- Loosening needs statistical evidence: only to a threshold whose Wilson lower bound (at the effective sample
  size of at least `min_evidence` labels) is at or above the target, testing from the strictest threshold
  towards the most permissive and stopping at the first whose observed rate misses the target (a fixed
  sequence, in the spirit of Learn-then-Test: a looser threshold past a bad region is never picked).

A threshold never admits a label it did not count: a candidate serve-above threshold sits at a label's score
(the next label is below it), a `route_mid` one just past a label's score but never past the next's (`<` excludes
that one), and a moved threshold is rounded towards the stricter side. A stored label with a non-finite score or
weight is never read back (a NaN mis-sorts the others and joins no tie: it would wedge the cell).

What the cache learned (the near-miss labels: rejected candidates, or a cluster vote short of its threshold,
whose fresh answer was the same) is what lets the semantic thresholds loosen at all: audited hits only ever speak
for thresholds at or above the current one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from frugalstream.audit import quality
from frugalstream.audit.cells import CellBook
from frugalstream.audit.quality import Graded
from frugalstream.llm.audit_stats import Proportion, weighted, wilson
from frugalstream.schemas import TASK_TYPES, TaskType
from frugalstream.schemas.audits import KNOB_BOUNDS as BOUNDS
from frugalstream.schemas.audits import Knob, ThresholdChange

SERVES_ABOVE: frozenset[Knob] = frozenset({"semantic_verify", "answer_cluster"})  # the saving is taken at score >= t
STEP = 1e-4  # "just past" a label's score


@dataclass(frozen=True)
class Label:
    score: float
    accepted: bool
    weight: float = 1.0
    grades: tuple[bool, bool] | None = None  # (cheap answer right, baseline right), when the judge graded both

    def graded(self) -> Graded:
        """For a quality-retained target: without grades, the baseline is taken as right and the cheap answer
        as right when accepted."""
        cheap, baseline = self.grades if self.grades is not None else (self.accepted, True)
        return Graded(self.score, float(cheap), float(baseline), self.weight)


def decided(knob: Knob, score: float, threshold: float) -> bool:
    """Does `threshold` take the saving for a decision of this score?"""
    return score >= threshold if knob in SERVES_ABOVE else score < threshold


def permissive(knob: Knob, a: float, b: float) -> bool:
    """Is threshold `a` more permissive (takes more savings) than `b`?"""
    return a < b if knob in SERVES_ABOVE else a > b


def usable(label: Label) -> bool:
    """A label the controller can sort and weigh: finite score, finite positive weight."""
    return math.isfinite(label.score) and math.isfinite(label.weight) and label.weight > 0


def stricter(knob: Knob, value: float) -> float:
    """`value` at 6 decimals, rounded towards the stricter side (up for serve-above knobs, down for `route_mid`),
    so rounding never moves a threshold onto a label it did not count."""
    r = round(value, 6)
    if knob in SERVES_ABOVE and r < value:
        return round(r + 1e-6, 6)
    if knob not in SERVES_ABOVE and r > value:
        return round(r - 1e-6, 6)
    return r


def acceptance_at(labels: list[Label], knob: Knob, threshold: float) -> Proportion:
    return weighted((lb.accepted, lb.weight) for lb in labels if decided(knob, lb.score, threshold))


@dataclass
class ThresholdController:
    """One per audit service; `observe` labels, `decide` returns a change (or None) for one cell. Each cell keeps
    `window` labels; the tenants not `reserve`d share one tenant's worth (`window` per task type and knob)."""

    min_evidence: int = 30
    window: int = 20_000
    clock: Callable[[], float] = field(default=time.time, repr=False)
    book: CellBook[tuple[str, str, Knob], Label] = field(init=False)

    def __post_init__(self) -> None:
        self.book = CellBook(self.window, (len(TASK_TYPES) + 1) * len(BOUNDS))

    def reserve(self, tenants: Iterable[str]) -> None:
        """The configured tenants: their cells are never evicted by other tenants' labels."""
        self.book.reserve(tenants)

    def observe(self, tenant: str, task_type: str, knob: Knob, label: Label, key: str) -> None:
        """`key`: the audit's id; observing it again (a person's later verdict) replaces its label, counted once."""
        self.book.put((tenant, task_type, knob), key, label)

    def labels(self, tenant: str, task_type: str, knob: Knob) -> list[Label]:
        """The cell's `usable` labels: every decision reads them here."""
        return [lb for lb in self.book.get((tenant, task_type, knob)).values() if usable(lb)]

    def decide(self, tenant: str, task_type: TaskType, knob: Knob, current: float,
               target: float) -> ThresholdChange | None:
        """`target`: minimum acceptance among the decisions taken (1 - false-hit bound for the cache)."""
        labels = self.labels(tenant, task_type, knob)
        if not labels:
            return None
        now = acceptance_at(labels, knob, current)
        best = self._most_permissive_holding(labels, knob, target)
        rejected_taken = [lb.score for lb in labels if not lb.accepted and decided(knob, lb.score, current)]
        if rejected_taken and now.rate < target:
            if best is not None and not permissive(knob, best, current):
                value = best
            else:
                above = knob in SERVES_ABOVE
                worst = max(rejected_taken) if above else min(rejected_taken)
                value = worst + STEP if above else worst
                if best is not None and permissive(knob, value, best):
                    value = best
            return self._change(tenant, task_type, knob, current, value, "bound_broken", target, labels)
        if best is not None and permissive(knob, best, current):
            return self._change(tenant, task_type, knob, current, best, "evidence", target, labels)
        return None

    def decide_quality(self, tenant: str, task_type: TaskType, current: float, target: float,
                       min_sample: int) -> ThresholdChange | None:
        """`route_mid` holding quality retained >= `target` (see `frugalstream.audit.quality`)."""
        labels = self.labels(tenant, task_type, "route_mid")
        found = quality.decide([lb.graded() for lb in labels], current, target, min_sample, BOUNDS["route_mid"])
        if found is None:
            return None
        value, reason, p = found
        value = stricter("route_mid", value)
        if abs(value - current) < STEP / 2:
            return None
        return ThresholdChange(
            tenant=tenant, task_type=task_type, knob="route_mid", value=value, previous=current,
            reason="bound_broken" if reason == "bound_broken" else "evidence", target=target, n=p.n,
            estimate=round(p.rate, 6), low=round(p.low, 6), high=round(p.high, 6), changed_at=float(self.clock()),
        )

    def _most_permissive_holding(self, labels: list[Label], knob: Knob, target: float) -> float | None:
        """The most permissive threshold whose lower bound holds the target, in one pass over the labels sorted by
        score (running weighted sums: O(n log n)); each candidate decides exactly the labels counted so far."""
        lo, hi = BOUNDS[knob]
        above = knob in SERVES_ABOVE
        ordered = sorted(labels, key=lambda lb: lb.score, reverse=above)
        total = square = good = 0.0
        best: float | None = None
        i = 0
        while i < len(ordered):
            score, j = ordered[i].score, i + 1
            while j < len(ordered) and ordered[j].score == score:  # ties are taken together; j > i: always advances
                j += 1
            for lb in ordered[i:j]:
                total, square, good = total + lb.weight, square + lb.weight ** 2, good + lb.weight * lb.accepted
            i = j
            n_eff = total * total / square
            if n_eff < self.min_evidence:
                continue
            if good / total < target:
                break  # the rate itself misses the target here: nothing more permissive is considered
            if wilson(good / total * n_eff, n_eff)[0] >= target:
                best = score if above else quality.past(score, ordered[i].score if i < len(ordered) else None)
        return None if best is None else min(max(best, lo), hi)

    def _change(self, tenant: str, task_type: TaskType, knob: Knob, previous: float, value: float,
                reason: str, target: float, labels: list[Label]) -> ThresholdChange | None:
        lo, hi = BOUNDS[knob]
        value = stricter(knob, min(max(value, lo), hi))
        if abs(value - previous) < STEP / 2:
            return None
        p = acceptance_at(labels, knob, value)
        return ThresholdChange(
            tenant=tenant, task_type=task_type, knob=knob, value=value, previous=previous,
            reason="bound_broken" if reason == "bound_broken" else "evidence", target=target,
            n=sum(1 for lb in labels if decided(knob, lb.score, value)), estimate=round(p.rate, 6),
            low=round(p.low, 6), high=round(p.high, 6), changed_at=float(self.clock()),
        )
