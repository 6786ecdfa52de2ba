"""Train the escalation router (services/frugalstream/classifier/router_model.npz) and bench it honestly.

    .venv/bin/python scripts/train_router.py [--data /work/shared/data]
                                             [--out services/frugalstream/classifier/router_model.npz]
                                             [--report benchmarks/route_train_report.json] [--no-cv]

Labels: RouteLLM's per-prompt correctness of Mixtral-8x7B (weak) and GPT-4 (strong) on MMLU and GSM8K,
minus the prompts RouteLLM lists as contaminated. What the router should rank by is the expected gain
of escalating, E[strong_correct - weak_correct | prompt]; sending prompts that both models get wrong
(or that only the weak one gets right) to the strong tier buys nothing. Three linear heads on the
MiniLM embedding estimate it, and a fourth reads the prompt's shape; each is z-scored and summed:

* ridge regression on the gain;
* P(strong correct) - P(weak correct) from two logistic regressions;
* a soft topic prior: a multinomial logistic regression over MMLU subjects (+ "gsm8k", + "faq")
  times the shrunken mean gain of each subject (difficulty is mostly a property of the topic);
* ridge regression of the gain on log counts of words, sentences and numbers, alone and times the
  topic posterior of "gsm8k". Chosen by 5-fold cross-fitting inside the training half only, before the
  held-out half was scored; the report's ``training_half_crossfit`` repeats that comparison.

A Platt map turns the sum into P(weak wrong and strong right), so the score is in [0, 1].
FAQ-style customer questions (banking77, clinc150; 600 each) are added as anchors labeled
"both tiers correct", so ordinary traffic scores low; they are never benched.

Honesty: rows are split by ``heldout_mask`` (SHA-256 of the prompt text, low bit: ~50/50). The
artifact holds two variants: ``full`` (all rows; what serving uses) and ``half`` (only the
non-held-out half; what ``frugalstream bench route`` uses on local data, scoring held-out rows only).
The report adds 5-fold cross-fitting (fold = SHA-256 bits 8+, mod 5): every row is scored by a model
that never saw it. Seeds are fixed; the embedding model is deterministic on CPU. Embeddings are
cached under /tmp. Under a minute with cached embeddings (BLAS pinned to 1 thread so reruns
reproduce the artifact bit for bit), plus ~10 minutes to embed on a cold cache.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # BLAS thread count changes lbfgs bits: pin it
import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.classifier.router import (  # noqa: E402
    DEFAULT_PATH,
    heldout_mask,
    predict_parts,
    prompt_hash64,
    prompt_key,
    structure_features,
    structure_inputs,
    topic_posterior,
)
from frugalstream.tools.evals import route_eval as rb  # noqa: E402

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"
CACHE = Path("/tmp/frugalstream_router_cache")
SEED = 0
N_ANCHOR = 600
SUBJECT_PRIOR = 5.0  # pseudo-rows pulling a subject's mean gain toward the global mean


PRECISION = "int8"  # what serving runs; --precision fp32 trains on the torch originals instead


def embed(texts: list[str]) -> np.ndarray:
    """MiniLM embeddings from the production embedder, cached in /tmp by precision and text list."""
    key = hashlib.sha256(("\x00".join(texts) + PRECISION + "-alone").encode("utf-8")).hexdigest()[:24]
    path = CACHE / f"{key}.npy"
    if path.exists():
        return np.asarray(np.load(path), dtype=np.float32)
    from frugalstream.llm.embedder import MiniLMEmbedder

    emb = MiniLMEmbedder(precision=PRECISION, cache_size=0).embed(texts)  # type: ignore[arg-type]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, emb.astype(np.float32))
    return np.asarray(emb, dtype=np.float32)


def load_routellm(data: Path) -> dict[str, Any]:
    prompts: list[str] = []
    weak: list[bool] = []
    strong: list[bool] = []
    subject: list[str] = []
    dataset: list[str] = []
    csv.field_size_limit(1 << 30)
    for name in ("mmlu", "gsm8k"):
        path = data / "routellm_eval" / f"{name}_responses.csv"
        bad = rb.load_contaminated(rb.find_contaminated_files(path))
        with open(path, newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                if prompt_key(rec["prompt"]) in bad:
                    continue
                prompts.append(rec["prompt"])
                weak.append(rec[WEAK] == "True")
                strong.append(rec[STRONG] == "True")
                subject.append(rec.get("subject") or name)
                dataset.append(name)
    return {
        "prompts": prompts,
        "weak": np.array(weak, float),
        "strong": np.array(strong, float),
        "subject": subject,
        "dataset": np.array(dataset),
    }


def load_anchors(data: Path) -> list[str]:
    """FAQ-style questions any tier answers; a deterministic hash sample."""
    with open(data / "banking77" / "train.csv", newline="", encoding="utf-8") as fh:
        banking = [r["text"] for r in csv.DictReader(fh)]
    clinc = [t for t, _ in json.loads((data / "clinc150" / "data_full.json").read_text())["train"]]
    out: list[str] = []
    for pool in (banking, clinc):
        out += sorted(set(pool), key=prompt_hash64)[:N_ANCHOR]
    return out


def fit_variant(
    x: np.ndarray, texts: list[str], w: np.ndarray, s: np.ndarray, subj: np.ndarray, n_cls: int, math_class: int
) -> dict[str, np.ndarray]:
    """Fit the four heads and the Platt map on the given rows; returns router parameters."""
    gain = s - w
    ridge = Ridge(alpha=10.0).fit(x, gain)
    lr_w = LogisticRegression(C=0.3, max_iter=3000).fit(x, w)
    lr_s = LogisticRegression(C=0.3, max_iter=3000).fit(x, s)
    topic = LogisticRegression(C=10.0, max_iter=300, random_state=SEED).fit(x, subj)
    glob = float(gain.mean())
    rate = np.full(n_cls, glob)
    for c in topic.classes_:
        m = subj == c
        rate[c] = (gain[m].sum() + SUBJECT_PRIOR * glob) / (m.sum() + SUBJECT_PRIOR)
    tw = np.zeros((n_cls, x.shape[1]), np.float32)
    tb = np.full(n_cls, -30.0, np.float32)  # classes absent from this variant's rows never fire
    tw[topic.classes_] = topic.coef_
    tb[topic.classes_] = topic.intercept_
    p: dict[str, np.ndarray] = {
        "W": np.vstack([ridge.coef_, lr_w.coef_, lr_s.coef_, tw]).astype(np.float32),
        "b": np.concatenate([[ridge.intercept_], lr_w.intercept_, lr_s.intercept_, tb]).astype(np.float32),
        "rate": rate.astype(np.float32),
        "zmean": np.zeros(4, np.float32),
        "zstd": np.ones(4, np.float32),
        "cal": np.array([1.0, 0.0], np.float32),
        "math_class": np.array(math_class, np.float32),
    }
    feats = structure_features(texts)
    p["smean"], p["sstd"] = feats.mean(0).astype(np.float32), (feats.std(0) + 1e-6).astype(np.float32)
    p["sw"], p["sb"] = np.zeros(8, np.float32), np.zeros((), np.float32)
    shape = Ridge(alpha=10.0).fit(structure_inputs(p, topic_posterior(p, x), texts), gain)
    p["sw"], p["sb"] = shape.coef_.astype(np.float32), np.array(shape.intercept_, np.float32)
    parts = predict_parts(p, x, texts)
    p["zmean"], p["zstd"] = parts.mean(0).astype(np.float32), (parts.std(0) + 1e-6).astype(np.float32)
    raw = ((parts - p["zmean"]) / p["zstd"]).sum(1)
    ft = (1 - w) * s
    cal = LogisticRegression(C=100.0).fit(raw[:, None], ft)  # monotone: ranking unchanged
    p["cal"] = np.array([cal.coef_[0, 0], cal.intercept_[0]], np.float32)
    return p


def raw_score(p: dict[str, np.ndarray], x: np.ndarray, texts: list[str], heads: int = 4) -> np.ndarray:
    """The summed z-scored heads; ``heads=3`` leaves out the structure head (the first session's design)."""
    return np.asarray(((predict_parts(p, x, texts) - p["zmean"]) / p["zstd"])[:, :heads].sum(1))


def bench_rows(d: dict[str, Any], scores: np.ndarray, mask: np.ndarray) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("mmlu", "gsm8k"):
        m = mask & (d["dataset"] == name)
        rows = [(d["prompts"][i], bool(d["weak"][i]), bool(d["strong"][i])) for i in np.flatnonzero(m)]
        out[name] = rb.run_route_bench(rows, scores[m], seed=SEED)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--out", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--report", type=Path, default=None)
    ap.add_argument("--no-cv", action="store_true", help="skip the 5-fold cross-fitted report")
    ap.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                    help="embeddings to train on: int8 (what serving runs, the default) or fp32")
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    t0 = time.time()
    np.random.seed(SEED)
    d = load_routellm(args.data)
    anchors = load_anchors(args.data)
    n = len(d["prompts"])
    x = np.vstack([embed(d["prompts"]), embed(anchors)])
    w = np.concatenate([d["weak"], np.ones(len(anchors))])
    s = np.concatenate([d["strong"], np.ones(len(anchors))])
    names = [*sorted(set(d["subject"])), "faq"]
    subj = np.array([names.index(v) for v in d["subject"]] + [names.index("faq")] * len(anchors))
    hashes = np.array([prompt_hash64(p) for p in d["prompts"]], dtype=np.uint64)
    ho = np.concatenate([heldout_mask(d["prompts"]), np.zeros(len(anchors), bool)])
    print(f"rows {n} (+{len(anchors)} anchors), held-out {int(ho.sum())}, embed {time.time() - t0:.0f}s", flush=True)

    report: dict[str, Any] = {"seed": SEED, "rows": n, "anchors": len(anchors)}
    texts = np.array(d["prompts"] + anchors, dtype=object)
    math = names.index("gsm8k")

    def fit(rows: np.ndarray) -> dict[str, np.ndarray]:
        return fit_variant(x[rows], list(texts[rows]), w[rows], s[rows], subj[rows], len(names), math)

    half = fit(~ho)
    report["heldout_half"] = bench_rows(d, raw_score(half, x[:n], d["prompts"]), ho[:n])
    if not args.no_cv:
        fold = ((hashes >> np.uint64(8)) % np.uint64(5)).astype(int)
        oof = np.zeros(n)
        for f in range(5):
            tr = np.concatenate([fold != f, np.ones(len(anchors), bool)])
            oof[fold == f] = raw_score(fit(tr), x[:n][fold == f], list(texts[:n][fold == f]))
        report["crossfit_5fold"] = bench_rows(d, oof, np.ones(n, bool))
        # How the structure head was chosen: cross-fitting inside the training half only, 3 vs 4 heads.
        inner = {3: np.zeros(n), 4: np.zeros(n)}
        for f in range(5):
            tr = np.concatenate([~ho[:n] & (fold != f), np.ones(len(anchors), bool)])
            rows = ~ho[:n] & (fold == f)
            params = fit(tr)
            for heads, out in inner.items():
                out[rows] = raw_score(params, x[:n][rows], list(texts[:n][rows]), heads)
        report["training_half_crossfit"] = {
            f"{heads}_heads": bench_rows(d, out, ~ho[:n]) for heads, out in inner.items()
        }
    full = fit(np.ones(len(texts), bool))

    arrays: dict[str, np.ndarray] = {}
    for tag, p, rows_mask in (("full", full, np.ones(n, bool)), ("half", half, ~ho[:n])):
        arrays.update({f"{tag}/{k}": v for k, v in p.items()})
        arrays[f"{tag}/hashes"] = np.sort(hashes[rows_mask])
    meta = {
        "version": 2,
        "subjects": names,
        "weak": WEAK,
        "strong": STRONG,
        "seed": SEED,
        "score": "P(weak wrong and strong right), Platt-mapped from 4 z-scored linear heads",
        "split": "heldout = sha256(prompt.strip()) first 8 bytes big-endian, low bit 1",
    }
    arrays["meta_json"] = np.array(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)  # type: ignore[arg-type]
    report["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) in {report['seconds']}s")


if __name__ == "__main__":
    main()
