"""`frugalstream calibrate`: tier thresholds from a sample of the team's own requests.

Scores are probabilities on the router's training distribution, not on yours, so thresholds are set by
quantiles of the scores your traffic actually gets: either a target share of large-tier calls, or (with
per-prompt correctness labels) the smallest large-tier share that keeps a target fraction of the strong
model's accuracy. The result is written to the TOML config file every service reads.

A threshold is a quantile of the sample, so a small sample gives a threshold that moves with every prompt:
the share it sends to the large tier is known only to about +-1.96 sqrt(p(1-p)/n) (at p = 10%: +-8 points at
n = 50, +-4 at n = 200). Under MIN_SAMPLES the command refuses (unless --force), under TRUST_SAMPLES it warns,
and it warns when the split would send nearly all traffic to one end, where routing saves nothing or risks
quality everywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from frugalstream.llm.cache_keys import clean_text, split_conversation
from frugalstream.runtime.settings import UsageError, config_path
from frugalstream.schemas import LLMRequest
from frugalstream.tools.evals.route_eval import accuracy_curve

MIN_SAMPLES = 50  # below this a 10% share is 5 prompts: refused unless --force
TRUST_SAMPLES = 200  # below this the large-tier share is uncertain by more than +-4 points: warned
NEARLY_ALL = 0.95  # a tier that gets this share or more of the sample is worth a warning
MIN_ABOVE = 20  # fewer sample prompts above the large threshold: it rests on a handful of scores


@dataclass(frozen=True)
class Calibration:
    mid: float
    large: float
    large_share: float
    mid_share: float
    samples: int
    quality: float | None = None


def load_prompts(path: Path, prompt_col: str | None) -> list[str]:
    """LLMRequest JSON lines (the last user turn is scored) or a CSV with a prompt column."""
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return [row[prompt_col or "prompt"] for row in csv.DictReader(f)]
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            request = LLMRequest.model_validate_json(line)
            prompts.append(clean_text(split_conversation(request.messages)[2]))
    return prompts


def _score_at_share(scores: npt.NDArray[np.float64], share: float) -> float:
    """The threshold that sends (about) `share` of these scores at or above it."""
    share = min(max(share, 0.0), 1.0)
    if share <= 0.0:
        return float(np.nextafter(scores.max(), np.inf))
    return float(np.quantile(scores, 1.0 - share, method="higher"))


def by_share(scores: npt.NDArray[np.float64], large_share: float, mid_share: float) -> Calibration:
    large = _score_at_share(scores, large_share)
    mid = min(_score_at_share(scores, large_share + mid_share), large)
    return Calibration(mid=mid, large=large, large_share=float((scores >= large).mean()),
                       mid_share=float(((scores >= mid) & (scores < large)).mean()), samples=len(scores))


def by_quality(scores: npt.NDArray[np.float64], weak: npt.NDArray[np.float64], strong: npt.NDArray[np.float64],
               quality: float, mid_share: float) -> Calibration:
    """Smallest large-tier share whose accuracy reaches `quality` x the strong model's accuracy."""
    acc = accuracy_curve(weak, strong, scores)
    target = quality * float(strong.mean())
    k = int(np.argmax(acc >= target - 1e-12)) if (acc >= target - 1e-12).any() else len(scores)
    cal = by_share(scores, k / len(scores), mid_share)
    return Calibration(cal.mid, cal.large, cal.large_share, cal.mid_share, cal.samples, quality=float(acc[k]))


_KEY = re.compile(r"^\s*route_threshold_(mid|large)\s*=.*$")


def write_thresholds(path: Path, cal: Calibration) -> None:
    """Replaces the two top-level keys and keeps everything else in the file as it was."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if not _KEY.match(line)]
    header = [
        f"# written by frugalstream calibrate on {cal.samples} requests: large {cal.large_share:.1%}, "
        f"mid {cal.mid_share:.1%}",
        f"route_threshold_mid = {cal.mid:.6f}",
        f"route_threshold_large = {cal.large:.6f}",
    ]
    kept = [line for line in kept if not line.startswith("# written by frugalstream calibrate")]
    text = "\n".join([*header, *kept]) + "\n"
    tomllib.loads(text)  # never leave a config the services cannot read
    path.write_text(text)


def small_share(cal: Calibration) -> float:
    return max(0.0, 1.0 - cal.large_share - cal.mid_share)


def check_sample(n: int, force: bool) -> None:
    """Refuses a sample too small to set a threshold from, unless forced (then `warnings` says so)."""
    if n < MIN_SAMPLES and not force:
        raise UsageError(f"calibrate --requests: {n} requests is too few to set thresholds from (at least "
                         f"{MIN_SAMPLES}, better {TRUST_SAMPLES}+ of your own traffic; --force to calibrate anyway)")


def warnings(cal: Calibration) -> list[str]:
    """What makes this calibration hard to trust, one sentence each."""
    out = []
    n, p = cal.samples, cal.large_share
    if n < TRUST_SAMPLES:
        half = 1.96 * math.sqrt(max(p, 0.05) * (1 - max(p, 0.05)) / n)
        out.append(f"small sample: {n} requests (fewer than {TRUST_SAMPLES}); the large-tier share is known only "
                   f"to +-{half:.0%} and the thresholds will move with your traffic")
    above = round(p * n)
    if 0 < above < MIN_ABOVE:
        out.append(f"only {above} sampled requests reach the large threshold: it rests on a handful of scores; "
                   "use a larger sample")
    if p >= NEARLY_ALL:
        out.append(f"these thresholds send {p:.0%} of requests to the large tier: routing saves nearly nothing")
    if small_share(cal) >= NEARLY_ALL:
        out.append(f"these thresholds send {small_share(cal):.0%} of requests to the small tier: hard requests "
                   "get the cheapest model too")
    return out


def summary(cal: Calibration, notes: list[str] | None = None) -> str:
    return json.dumps({"route_threshold_mid": cal.mid, "route_threshold_large": cal.large,
                       "large_share": cal.large_share, "mid_share": cal.mid_share, "small_share": small_share(cal),
                       "samples": cal.samples, "quality": cal.quality,
                       "warnings": warnings(cal) if notes is None else notes}, indent=2)


def score_prompts(prompts: list[str]) -> npt.NDArray[np.float64]:
    """The classifier's escalation scores (loads the router and the embedder: seconds)."""
    from frugalstream.classifier.router import EscalationRouter
    from frugalstream.llm.embedder import MiniLMEmbedder

    return EscalationRouter.load().score(MiniLMEmbedder().embed(prompts), prompts).astype(np.float64)


def cmd_calibrate(args: argparse.Namespace) -> int:
    if (args.strong_share is None) == (args.target_quality is None):
        raise UsageError("calibrate: give exactly one of --strong-share or --target-quality")
    path = Path(args.requests)
    if not path.is_file():
        raise UsageError(f"calibrate --requests: {path} does not exist (give LLMRequest JSON lines or a CSV)")
    if args.target_quality is not None and not (args.weak_col and args.strong_col and path.suffix == ".csv"):
        raise UsageError("calibrate: --target-quality needs a CSV with --weak-col and --strong-col (True/False)")
    prompts = load_prompts(path, args.prompt_col)
    check_sample(len(prompts), args.force)
    scores = score_prompts(prompts)
    if args.strong_share is not None:
        cal = by_share(scores, args.strong_share, args.mid_share)
    else:
        from frugalstream.tools.evals.route_eval import load_route_csv

        rows = load_route_csv(path, args.prompt_col or "prompt", args.weak_col, args.strong_col, set())
        weak = np.array([r[1] for r in rows], dtype=np.float64)
        strong = np.array([r[2] for r in rows], dtype=np.float64)
        cal = by_quality(scores, weak, strong, args.target_quality, args.mid_share)
    notes = warnings(cal)
    for note in notes:
        sys.stderr.write(f"frugalstream calibrate: warning: {note}\n")
    sys.stderr.write(f"frugalstream calibrate: split on {cal.samples} requests: small {small_share(cal):.1%}, "
                     f"mid {cal.mid_share:.1%}, large {cal.large_share:.1%}\n")
    print(summary(cal, notes))
    if args.dry_run:
        sys.stderr.write("frugalstream calibrate: --dry-run, nothing written\n")
        return 0
    target = Path(args.config) if args.config else config_path()
    write_thresholds(target, cal)
    sys.stderr.write(f"frugalstream calibrate: wrote thresholds to {target}\n")
    return 0


def add_calibrate_parser(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="set tier thresholds from a sample of your own requests")
    p.add_argument("--requests", required=True, help="LLMRequest JSON lines, or a CSV with --prompt-col")
    p.add_argument("--prompt-col", help="prompt column of a CSV sample")
    p.add_argument("--strong-share", type=float, help="target share of large-tier calls, e.g. 0.1")
    p.add_argument("--target-quality", type=float, help="fraction of the strong model's accuracy to keep, e.g. 0.95")
    p.add_argument("--weak-col", help="CSV column: did the cheap model answer correctly")
    p.add_argument("--strong-col", help="CSV column: did the strong model answer correctly")
    p.add_argument("--mid-share", type=float, default=0.15, help="share of mid-tier calls below the large ones")
    p.add_argument("--config", help="TOML config to update (default: $FRUGAL_CONFIG or ./frugalstream.toml)")
    p.add_argument("--dry-run", action="store_true", help="show the split and warnings, write nothing")
    p.add_argument("--force", action="store_true",
                   help=f"calibrate on fewer than {MIN_SAMPLES} requests (warned: thresholds from so few move a lot)")
    p.set_defaults(func=cmd_calibrate)
