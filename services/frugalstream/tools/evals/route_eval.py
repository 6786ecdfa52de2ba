"""Routing benchmark: how many strong-model calls a router needs to keep quality.

Given per-prompt correctness of a weak and a strong model and a router score per prompt, the
top-k scored prompts go to the strong model (k = 0..n). From that sweep we report:

* ``apgr``: RouteLLM's average performance gap recovered, the trapezoid area under
  (strong share k/n, PGR(k)) with PGR = (acc(k) - acc_weak) / (acc_strong - acc_weak).
* ``strong_share_at_95``: smallest k/n with acc(k) >= 0.95 * acc_strong;
  ``cost_reduction_at_95`` = 1 - that share.
* the same for a random router: ``random_*`` is the exact expectation (a random order makes the
  expected accuracy curve the straight line from acc_weak to acc_strong, so random APGR = 0.5), and
  ``random_sim_*`` averages the metrics of 50 seeded random permutations.

Tied scores never get an arbitrary order: inside a block of equal scores the accuracy is
interpolated linearly, i.e. the expectation over all orders of the tied prompts. A constant
score therefore benches exactly like the random router.

Honesty: a router must not be scored on prompts it was trained on. ``heldout_mask`` is the
deterministic hash split that ``scripts/train_router.py`` uses; ``honest_router_and_mask`` picks the
router variant and the rows that together never overlap.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

# The held-out split is the router's own (it excludes those rows when loaded for an honest bench).
from frugalstream.classifier.router import heldout_mask, prompt_key

if TYPE_CHECKING:
    from frugalstream.classifier.router import EscalationRouter

Row = tuple[str, bool, bool]
TARGET = 0.95
RANDOM_SEEDS = 50
_TRUE = {"true", "1", "yes", "t", "y", "1.0"}
_FALSE = {"false", "0", "no", "f", "n", "0.0", ""}


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def find_contaminated_files(csv_path: Path) -> list[Path]:
    """Contamination lists next to a RouteLLM csv: ``<prefix>_contaminated_prompts.jsonl`` where
    the csv name starts with ``<prefix>`` (e.g. mmlu_responses.csv -> mmlu_...), or RouteLLM's own
    ``contaminated_prompts.jsonl`` in the same folder."""
    csv_path = Path(csv_path)
    found: list[Path] = []
    for cand in sorted(csv_path.parent.glob("*contaminated_prompts.jsonl")):
        prefix = cand.name[: -len("contaminated_prompts.jsonl")].rstrip("_")
        if prefix == "" or csv_path.name.startswith(prefix + "_") or csv_path.stem == prefix:
            found.append(cand)
    return found


def load_contaminated(files: list[Path]) -> set[str]:
    """Eval-side prompts RouteLLM found overlapping its router training data (RouteLLM drops them)."""
    out: set[str] = set()
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    out.add(prompt_key(str(rec.get("eval_prompt", ""))))
    out.discard("")
    return out


def load_route_csv(
    path: Path | str, prompt_col: str, weak_col: str, strong_col: str, contaminated: set[str]
) -> list[Row]:
    """Rows (prompt, weak_correct, strong_correct), dropping prompts listed as contaminated."""
    csv.field_size_limit(1 << 30)
    bad = {prompt_key(p) for p in contaminated}
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {prompt_col, weak_col, strong_col} - set(reader.fieldnames or [])
        if missing:
            raise KeyError(f"columns not in {path}: {sorted(missing)}")
        for rec in reader:
            prompt = rec[prompt_col]
            if prompt_key(prompt) in bad:
                continue
            rows.append((prompt, _parse_bool(rec[weak_col]), _parse_bool(rec[strong_col])))
    return rows


def accuracy_curve(
    weak: npt.NDArray[np.float64], strong: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """acc(k), k = 0..n, sending the top-k scores to the strong model; ties interpolated."""
    n = len(weak)
    order = np.argsort(-scores, kind="stable")
    gain = (strong - weak)[order]
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    s = scores[order]
    # tie blocks [start, end): replace the cumulative gain inside a block by a straight line
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    ends = np.append(starts[1:], n)
    k = np.arange(n + 1)
    block = np.searchsorted(starts, k, side="right") - 1
    block = np.clip(block, 0, len(starts) - 1)
    a, b = starts[block], ends[block]
    frac = (k - a) / np.maximum(b - a, 1)
    interp = cum[a] + frac * (cum[b] - cum[a])
    return np.asarray((weak.sum() + interp) / n, dtype=np.float64)


def curve_metrics(acc: npt.NDArray[np.float64], acc_weak: float, acc_strong: float) -> dict[str, float]:
    n = len(acc) - 1
    share = np.arange(n + 1) / n
    gap = acc_strong - acc_weak
    pgr = (acc - acc_weak) / gap if gap > 0 else np.full_like(acc, np.nan)
    hit = np.flatnonzero(acc >= TARGET * acc_strong - 1e-12)
    k95 = int(hit[0]) if len(hit) else n
    return {
        "apgr": float(np.trapezoid(pgr, share)),
        "strong_share_at_95": k95 / n,
        "cost_reduction_at_95": 1.0 - k95 / n,
    }


def run_route_bench(rows: list[Row], scores: npt.ArrayLike, seed: int = 0) -> dict[str, Any]:
    """Bench one router score per row; see the module docstring for the exact definitions."""
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(rows)
    if n == 0 or len(sc) != n:
        raise ValueError(f"need one score per row, got {len(sc)} scores for {n} rows")
    if not np.all(np.isfinite(sc)):
        raise ValueError("scores must be finite")
    weak = np.array([r[1] for r in rows], dtype=np.float64)
    strong = np.array([r[2] for r in rows], dtype=np.float64)
    acc_weak, acc_strong = float(weak.mean()), float(strong.mean())
    out: dict[str, Any] = {"n": n, "acc_weak": acc_weak, "acc_strong": acc_strong}
    out.update(curve_metrics(accuracy_curve(weak, strong, sc), acc_weak, acc_strong))

    k = np.arange(n + 1)
    expected = acc_weak + k / n * (acc_strong - acc_weak)
    out.update({f"random_{m}": v for m, v in curve_metrics(expected, acc_weak, acc_strong).items()})
    rng = np.random.default_rng(seed)
    sims = [
        curve_metrics(accuracy_curve(weak, strong, rng.permutation(n).astype(np.float64)), acc_weak, acc_strong)
        for _ in range(RANDOM_SEEDS)
    ]
    for m in sims[0]:
        out[f"random_sim_{m}"] = float(np.mean([s[m] for s in sims]))
    oracle = (strong - weak) + 1e-3 * strong  # helpful first, then ties that cost nothing
    out["oracle_strong_share_at_95"] = curve_metrics(accuracy_curve(weak, strong, oracle), acc_weak, acc_strong)[
        "strong_share_at_95"
    ]
    return out


def honest_router_and_mask(
    prompts: list[str], path: Path | None = None
) -> tuple[EscalationRouter, npt.NDArray[np.bool_], str]:
    """The router and the rows it may be benched on without having seen them in training.

    If none of the prompts was in the shipped router's training set (new data), use the full
    router on every row. Otherwise use the variant trained only on the non-held-out hash half and
    bench only held-out rows that it never saw.
    """
    from frugalstream.classifier.router import EscalationRouter

    full = EscalationRouter.load(path)
    if not full.seen(prompts).any():
        return full, np.ones(len(prompts), dtype=bool), "all rows (none seen in training)"
    half = EscalationRouter.load(path, exclude_heldout=True)
    mask = heldout_mask(prompts) & ~half.seen(prompts)
    return half, mask, "held-out hash half, router trained on the other half only"
