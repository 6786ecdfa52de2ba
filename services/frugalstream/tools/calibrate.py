"""`frugalstream calibrate`: tier thresholds from a sample of the team's own requests.

Scores are probabilities on the router's training distribution, not on yours, so thresholds are set by
quantiles of the scores your traffic actually gets: either a target share of large-tier calls, or (with
per-prompt correctness labels) the smallest large-tier share that keeps a target fraction of the strong
model's accuracy. The result is written to the TOML config file every service reads.
"""

from __future__ import annotations

import csv
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from frugalstream.llm.cache_keys import clean_text, split_conversation
from frugalstream.schemas import LLMRequest
from frugalstream.tools.evals.route_eval import accuracy_curve


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


def summary(cal: Calibration) -> str:
    return json.dumps({"route_threshold_mid": cal.mid, "route_threshold_large": cal.large,
                       "large_share": cal.large_share, "mid_share": cal.mid_share, "samples": cal.samples,
                       "quality": cal.quality}, indent=2)
