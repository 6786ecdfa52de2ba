"""How much escalation signal other heads find in a prompt's text on MMLU, beyond the shipped router's.

    .venv/bin/python -m scripts.router_ceiling [--data /work/shared/data] [--json benchmarks/router_ceiling.json]

Fits each head on the MMLU rows of the router's training hash half and scores the held-out half (the rows
`frugalstream bench audit --routing` replays). Features: the prompt's int8 MiniLM embedding (the first 256
tokens, as served), an embedding of its last 700 characters (the question and its choices, which a long
passage pushes out of the first window), the router's shape features, and the subject (which no request
carries: an upper bound on what a topic can add). Heads: ridge regression of the gain (strong right - weak
right), a small MLP and gradient-boosted trees. Reports, per head, the AUC of "weak wrong, strong right" and
the priced frontier: the largest cost reduction (gpt-4o-mini for the weak answers, gpt-4o for the strong
ones, 20 output tokens each, as the labelled provider answers) of any threshold whose quality retained
(served right / strong right) is at least 0.95 on the whole held-out half. Embeddings are cached under /tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]
from sklearn.linear_model import Ridge  # type: ignore[import-untyped]
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]
from sklearn.neural_network import MLPRegressor  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.classifier.router import EscalationRouter, heldout_mask, structure_features  # noqa: E402
from scripts.train_router import embed, load_routellm  # noqa: E402

TAIL_CHARS = 700
OUTPUT_TOKENS = 20
PRICES = {"weak": (0.15, 0.60), "strong": (2.50, 10.00)}  # $ per 1M input / output tokens


def frontier(key: np.ndarray, weak: np.ndarray, strong: np.ndarray, tokens: np.ndarray,
             target: float = 0.95) -> tuple[float, float]:
    """(cost reduction, share routed down) of the loosest threshold on `key` that keeps `target` quality."""
    def cost(tier: str) -> np.ndarray:
        pin, pout = PRICES[tier]
        return np.asarray((tokens * pin + OUTPUT_TOKENS * pout) / 1e6)
    cs, cw = cost("strong"), cost("weak")
    order = np.argsort(key, kind="stable")  # lowest escalation first: routed down first
    right = np.r_[strong.sum(), strong.sum() + np.cumsum(weak[order] - strong[order])]
    spent = np.r_[cs.sum(), cs.sum() + np.cumsum(cw[order] - cs[order])]
    k = int(np.max(np.where(right >= target * strong.sum())[0]))
    return float(1 - spent[k] / cs.sum()), k / len(order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tiktoken

    d = load_routellm(args.data)
    keep = d["dataset"] == "mmlu"
    texts = [p for p, k in zip(d["prompts"], keep, strict=True) if k]
    weak, strong = d["weak"][keep], d["strong"][keep]
    subjects = np.array([s for s, k in zip(d["subject"], keep, strict=True) if k])
    held = heldout_mask(texts)
    x, tail = embed(texts), embed([t[-TAIL_CHARS:] for t in texts])
    shape = structure_features(texts)
    shape = (shape - shape[~held].mean(0)) / shape[~held].std(0)
    onehot = (subjects[:, None] == np.unique(subjects)[None, :]).astype(np.float32)
    gain, escalate = strong - weak, (weak == 0) & (strong == 1)
    enc = tiktoken.get_encoding("o200k_base")
    tokens = np.array([len(enc.encode(t)) for t in texts])[held]

    def row(name: str, score: np.ndarray) -> dict[str, Any]:
        reduction, down = frontier(score, weak[held], strong[held], tokens)
        return {"head": name, "auc": round(float(roc_auc_score(escalate[held], score)), 4),
                "frontier_cost_reduction": round(reduction, 4), "share_routed_down": round(down, 4)}

    router = EscalationRouter.load(exclude_heldout=True)
    held_texts = [t for t, h in zip(texts, held, strict=True) if h]
    rows = [row("shipped router (half variant)", router.score(x[held], held_texts))]
    features = {"embedding": x, "tail embedding": tail, "embedding + tail + shape": np.hstack([x, tail, shape]),
                "embedding + tail + shape + subject": np.hstack([x, tail, shape, onehot])}
    for name, f in features.items():
        rows.append(row(f"ridge: {name}", Ridge(alpha=30.0).fit(f[~held], gain[~held]).predict(f[held])))
    f = features["embedding + tail + shape"]
    mlp = MLPRegressor(hidden_layer_sizes=(128,), alpha=1.0, max_iter=300, early_stopping=True, random_state=0)
    rows.append(row("mlp (128): embedding + tail + shape", mlp.fit(f[~held], gain[~held]).predict(f[held])))
    trees = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
    rows.append(row("boosted trees: embedding + tail + shape", trees.fit(f[~held], gain[~held]).predict(f[held])))
    print(f"{'head':48s} {'AUC':>7s} {'frontier':>9s} {'down':>6s}   (held-out MMLU half: {int(held.sum())} prompts)")
    for r in rows:
        print(f"{r['head']:48s} {r['auc']:7.4f} {r['frontier_cost_reduction']:9.4f} {r['share_routed_down']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"heldout_prompts": int(held.sum()), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
