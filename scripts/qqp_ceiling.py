"""How far more QQP training data could move precision at recall 0.40, and what the errors look like.

    .venv/bin/python scripts/qqp_ceiling.py [--json benchmarks/qqp_ceiling.json] [--audit 40]

Learning curve: two cheap pair models, trained on 1/8, 1/4, 1/2 and all of the QQP "train" bucket, scored
on QQP "val" (QQP dev is never read) through the production gate (cosine >= 0.80, no rule veto):
- the shipped lexical MLP's recipe (22 order-sensitive lexical features + cosine);
- a bag of *differing* tokens (logistic regression over the words one question has and the other lacks),
  the model that should gain most from more data, since it learns which differences Quora cares about.
Their precision at recall 0.40 is printed per size (mean of two draws). ``--audit N`` also prints the N
highest-scored label-0 val pairs of the shipped verifier, for a reader to judge.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.llm.pair_encoder import logit  # noqa: E402
from frugalstream.llm.verifier import _STOPWORDS, _stem, _tokens  # noqa: E402
from frugalstream.tools.evals.pair_eval import Pair  # noqa: E402
from scripts.train_verifier import SEED, embed_cosines, featurize, load_training_data  # noqa: E402

GATE = 0.80
RECALL = 0.40


def diff_tokens(a: str, b: str) -> dict[str, float]:
    ta, tb = {_stem(t) for t in _tokens(a)}, {_stem(t) for t in _tokens(b)}
    diff = ta ^ tb
    feats = {f"d:{t}": 1.0 for t in diff}
    feats.update({f"s:{t}": 0.3 for t in ta & tb if t not in _STOPWORDS})
    feats["n_diff"] = len(diff) / 5
    return feats


def precision_at_recall(score: np.ndarray, y: np.ndarray, asked: np.ndarray, recall: float = RECALL) -> float:
    order = np.argsort(-np.where(asked, score, -np.inf))
    tp = np.cumsum(y[order])
    k = int(np.searchsorted(tp, recall * y.sum()))
    return float(tp[k] / (k + 1))


def learning_curve(train: list[Pair], val: list[Pair]) -> list[dict[str, float]]:
    from sklearn.feature_extraction import FeatureHasher  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]

    hasher = FeatureHasher(2**20)
    cos_tr, cos_va = embed_cosines(train), embed_cosines(val)
    x_tr, _ = featurize(train, cos_tr)
    x_va, veto_va = featurize(val, cos_va)
    mean, scale = x_tr.mean(0), x_tr.std(0) + 1e-6
    h_tr = hasher.transform([diff_tokens(a, b) for a, b, _ in train])
    h_va = hasher.transform([diff_tokens(a, b) for a, b, _ in val])
    y_tr, y_va = np.array([y for *_, y in train]), np.array([y for *_, y in val])
    asked = (cos_va >= GATE) & ~veto_va
    rows = []
    for frac in (0.125, 0.25, 0.5, 1.0):
        runs = []
        for draw in range(2):
            sel = np.random.default_rng(draw).permutation(len(train))[: int(frac * len(train))]
            mlp = MLPClassifier((32,), alpha=1e-3, max_iter=300, early_stopping=True, random_state=draw)
            lex = mlp.fit(((x_tr - mean) / scale)[sel], y_tr[sel]).predict_proba((x_va - mean) / scale)[:, 1]
            diff = LogisticRegression(C=1.0, max_iter=2000).fit(h_tr[sel], y_tr[sel]).predict_proba(h_va)[:, 1]
            runs.append([precision_at_recall(s, y_va, asked) for s in (lex, diff, logit(lex) + logit(diff))])
        m = np.mean(runs, axis=0)
        rows.append({"train_pairs": len(sel), "lexical_mlp": round(float(m[0]), 3),
                     "diff_tokens": round(float(m[1]), 3), "both": round(float(m[2]), 3)})
        print(f"{len(sel):>6} QQP train pairs: precision at recall {RECALL} on val: lexical MLP {m[0]:.3f}, "
              f"differing tokens {m[1]:.3f}, both {m[2]:.3f}", flush=True)
    return rows


def audit(val: list[Pair], n: int) -> list[dict[str, object]]:
    from frugalstream.llm.pair_encoder import CrossEncoderVerifier

    verifier = CrossEncoderVerifier.load()
    cos = embed_cosines(val)
    asked = [i for i in range(len(val)) if cos[i] >= verifier.recall_cosine]
    scores = verifier.score_batch([(val[i][0], val[i][1], float(cos[i])) for i in asked])
    ranked = sorted(zip(scores, asked, strict=True), reverse=True)
    out = [{"score": round(float(s), 3), "text_a": val[i][0], "text_b": val[i][1]} for s, i in ranked
           if val[i][2] == 0][:n]
    for row in out:
        print(f"{row['score']:.3f}  {row['text_a']}  ||  {row['text_b']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--audit", type=int, default=0, help="print the N highest-scored label-0 val pairs")
    args = ap.parse_args()
    data = load_training_data(random.Random(SEED))
    result: dict[str, object] = {"learning_curve": learning_curve(data.qqp["train"], data.qqp["val"])}
    if args.audit:
        result["highest_scored_label_0_val_pairs"] = audit(data.qqp["val"], args.audit)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
