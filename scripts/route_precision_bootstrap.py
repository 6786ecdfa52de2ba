"""Is int8 routing worse than fp32, or is the held-out half too small to tell? A paired bootstrap.

Scores the held-out half of a RouteLLM outcome file with two routers, each on its own embeddings: the fp32 router
(an earlier `router_model.npz`, e.g. `git show c23847c:services/frugalstream/classifier/router_model.npz`) on
fp32 MiniLM vectors, the shipped int8 router on int8 vectors. Rows are resampled together (1,000 times); printed:
each router's cost reduction at 95% quality and APGR, and the 95% interval of their difference.

    .venv/bin/python scripts/route_precision_bootstrap.py --dataset $DATA/routellm_eval/gsm8k_responses.csv \
        --fp32-router /tmp/router_fp32.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import numpy.typing as npt

from frugalstream.classifier.router import EscalationRouter, heldout_mask
from frugalstream.llm.embedder import MiniLMEmbedder
from frugalstream.tools.evals.route_eval import (
    accuracy_curve,
    curve_metrics,
    find_contaminated_files,
    load_contaminated,
    load_route_csv,
)

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--fp32-router", type=Path, required=True)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    contaminated = load_contaminated(find_contaminated_files(args.dataset))
    rows = load_route_csv(args.dataset, "prompt", WEAK, STRONG, contaminated)
    prompts = [r[0] for r in rows]
    scores: dict[str, npt.NDArray[np.float64]] = {}
    mask = heldout_mask(prompts)
    routers = {"fp32": EscalationRouter.load(args.fp32_router, exclude_heldout=True),
               "int8": EscalationRouter.load(None, exclude_heldout=True)}
    for router in routers.values():
        mask &= ~router.seen(prompts)
    scored = [p for p, keep in zip(prompts, mask, strict=True) if keep]
    for precision, router in routers.items():
        vectors = MiniLMEmbedder(precision=precision, max_seq_tokens=256).embed(scored)
        scores[precision] = np.asarray(router.score(vectors, scored), dtype=np.float64).reshape(-1)
    kept = [r for r, keep in zip(rows, mask, strict=True) if keep]
    weak = np.array([r[1] for r in kept], dtype=np.float64)
    strong = np.array([r[2] for r in kept], dtype=np.float64)

    def measure(idx: npt.NDArray[np.int64], precision: str) -> tuple[float, float]:
        w, s = weak[idx], strong[idx]
        m = curve_metrics(accuracy_curve(w, s, scores[precision][idx]), float(w.mean()), float(s.mean()))
        return 1 - m["strong_share_at_95"], m["apgr"]

    every = np.arange(len(kept))
    for precision in routers:
        cr, apgr = measure(every, precision)
        print(f"{precision}: rows {len(kept)}, cost_reduction_at_95 {cr:.3f}, apgr {apgr:.3f}")
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(args.resamples):
        idx = rng.integers(0, len(kept), len(kept))
        (cr8, ap8), (cr32, ap32) = measure(idx, "int8"), measure(idx, "fp32")
        diffs.append((cr8 - cr32, ap8 - ap32))
    d = np.array(diffs)
    for col, name in enumerate(("cost_reduction_at_95", "apgr")):
        low, high = np.percentile(d[:, col], [2.5, 97.5])
        print(f"int8 - fp32 {name}: mean {d[:, col].mean():+.3f}, 95% interval [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
