"""Answer-cluster serving rules for a semantic cache: recall / false-hit curves on simulated FAQ streams.

    cd /work/main && .venv/bin/python scripts/answer_clusters_experiment.py [--data ../shared/data] [--rules NAME]

Each stream of questions goes through a simulated cache: a miss is answered with the canonical answer of the
question's label and cached with it; questions with one answer form an answer cluster. A rule turns what the
cache knows (kNN votes, cluster centroids and sizes, optionally a pair-encoder score) into ONE confidence per
query; the cache serves the winning cluster's answer when confidence >= threshold. Per stream: recall = right
cache answers / requests whose label appeared before; false-hit rate (FH) = wrong cache answers / cache answers.
Cache policies: "miss-only" (a served question is not cached) and "add-served" (cached with the answer served).

Thresholds are chosen on TUNING streams only (CLINC150 train: 3 draws of 150 intents x 20; banking77 train:
3 shuffles, 3,000 each): best mean recall with FH <= 1% on each tuning dataset (pooled over its streams); the
logistic rules are fit on the same streams. Then, once: CLINC150 val (random.Random(0) shuffle) and snips
(labels carry slot values: look-alikes need different answers), plus for information the CLINC val curve, its
best recall at FH <= 1% (oracle) and val reshuffled with seeds 1-4. MiniLM int8 vectors are cached in
/tmp/answer_clusters/<dataset>.npy, pair-encoder scores in pair_scores.json; results go to results.json there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")  # at most 2 threads, set before numpy loads its BLAS

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("/tmp/answer_clusters")
Rows = list[tuple[str, str]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Conf = Callable[[F64, int, int], float]  # (features, query position, nearest winning member position) -> score
FEATS = ("top", "top_other", "share", "support", "cent", "cent_other", "log_size", "mean_q", "intra", "all3")
LOG2 = float(np.log(3.0)) - 1e-9  # log1p(cluster size) >= LOG2 <=> the winning cluster has >= 2 members
PE_GATE = 0.5  # the pair encoder is only asked when the logistic model alone gives >= this
FH_MAX = 0.01
K, TEMP = 10, 0.1  # kNN vote: the K nearest cached questions, weight exp((cos - top cos) / TEMP)


def clinc(data: Path, split: str) -> Rows:
    return [(t, y) for t, y in json.loads((data / "clinc150" / "data_full.json").read_text())[split] if y != "oos"]


def from_csv(path: Path, label_col: str) -> Rows:
    with path.open(newline="", encoding="utf-8") as f:
        return [(r["text"], r[label_col]) for r in csv.DictReader(f)]


def shuffled(rows: Rows, seed: int, n: int = 3000, per_label: int = 0) -> Rows:
    """First n rows after a seeded shuffle; with per_label, first a seeded draw of per_label rows per label."""
    rng = random.Random(seed)
    if per_label:
        by: dict[str, Rows] = {}
        for r in rows:
            by.setdefault(r[1], []).append(r)
        rows = [r for lab in sorted(by) for r in rng.sample(by[lab], per_label)]
    rows = list(rows)
    rng.shuffle(rows)
    return [(" ".join(t.lower().split()), lab) for t, lab in rows[:n]]  # the text the cache sees


def load_streams(data: Path) -> dict[str, list[Rows]]:
    banking, val = from_csv(data / "banking77" / "train.csv", "category"), clinc(data, "val")
    return {"clinc_train": [shuffled(clinc(data, "train"), s, per_label=20) for s in (1, 2, 3)],
            "banking77": [shuffled(banking, s) for s in (0, 1, 2)],
            "clinc_val": [shuffled(val, 0)],
            "clinc_val_reshuffled": [shuffled(val, s) for s in (1, 2, 3, 4)],  # information only
            "snips": [shuffled(from_csv(data / "snips_nlu" / "utterances.csv", "label"), 0)]}


def embed_cached(name: str, texts: list[str]) -> dict[str, F32]:
    """Vectors of `texts`, cached in OUT/<name>.npy (+ .json with the texts); only new texts are embedded."""
    vec_path, txt_path = OUT / f"{name}.npy", OUT / f"{name}.json"
    known: list[str] = json.loads(txt_path.read_text()) if txt_path.exists() else []
    vecs = np.load(vec_path) if vec_path.exists() else np.zeros((0, 384), np.float32)
    missing = sorted(set(texts) - set(known))
    if missing:
        from frugalstream.llm.embedder import MiniLMEmbedder

        emb = MiniLMEmbedder(precision="int8", max_seq_tokens=256, threads=2)
        vecs = np.vstack([vecs, emb.embed(missing)]).astype(np.float32)
        known += missing
        np.save(vec_path, vecs)
        txt_path.write_text(json.dumps(known))
    return dict(zip(known, vecs, strict=True))


@dataclass
class Ctx:
    texts: list[str]
    y: I64  # answer id per question (= its label)
    sim: F32  # all pairwise cosines of the stream (brute force; streams are small)


def contexts(data: Path) -> dict[str, list[Ctx]]:
    out: dict[str, list[Ctx]] = {}
    for name, streams in load_streams(data).items():
        vec = embed_cached(name.removesuffix("_reshuffled"), [t for s in streams for t, _ in s])
        out[name] = []
        for rows in streams:
            ids = {lab: i for i, lab in enumerate(dict.fromkeys(lab for _, lab in rows))}
            v = np.stack([vec[t] for t, _ in rows])
            out[name].append(Ctx([t for t, _ in rows], np.array([ids[lab] for _, lab in rows]), v @ v.T))
    return out


def features(sims: F32, ans: I64, norm2: F64, size: I64) -> tuple[int, int, F64]:
    """(winning answer, position of its nearest cached member, features) of one query against the cache.

    sims/ans: cosine to and answer of each cached question; norm2/size: per answer cluster, the squared norm of
    the sum of its member vectors and its member count. Features: top = cosine of the winner's nearest member,
    top_other = best other-answer cosine among the K nearest (else the K-th cosine), share = winner's vote share,
    support = winner's members among the K, cent/cent_other = cosine to the winner's centroid / best other
    centroid, log_size = log1p(winner size), mean_q = mean cosine to the winner's members, intra = mean pairwise
    cosine inside the winner (1 for a singleton), all3 = 3rd cosine if the 3 nearest share an answer (else 0).
    In production: one K-NN search over questions + a top-2 search over centroids (running sums per answer).
    """
    kk = min(K, len(sims))
    top = np.argpartition(-sims, kk - 1)[:kk] if kk < len(sims) else np.arange(len(sims))
    top = top[np.argsort(-sims[top])]
    w = np.exp((sims[top] - sims[top[0]]) / TEMP)
    votes = np.bincount(ans[top], weights=w)
    win = int(votes.argmax())
    num = np.bincount(ans, weights=sims, minlength=len(norm2))
    cent = num / np.sqrt(np.maximum(norm2, 1e-9))
    cent_win, n_win = cent[win], int(size[win])
    cent[(size == 0) | (np.arange(len(cent)) == win)] = -1.0
    other = ans[top] != win
    best = int(top[np.argmin(other)])  # nearest member of the winning cluster (always among the K nearest)
    top_other = float(sims[top[other]].max()) if other.any() else float(sims[top[-1]])  # bound: K-th cosine
    intra = (norm2[win] - n_win) / (n_win * (n_win - 1)) if n_win > 1 else 1.0
    all3 = float(sims[top[2]]) if kk >= 3 and (ans[top[:3]] == ans[top[0]]).all() else 0.0
    f = np.array([sims[best], top_other, votes[win] / w.sum(), (~other).sum(), cent_win, cent.max(),
                  np.log1p(n_win), num[win] / n_win, intra, all3])
    return win, best, f


def simulate(ctx: Ctx, conf: Conf, thr: float, add_served: bool) -> dict[str, F64]:
    """One stream through the cache at one threshold: per query served, correct, eligible, conf, winner, features.

    A miss caches the question with its true answer; a hit caches it (with the served answer) only if add_served.
    """
    sim, y, n = ctx.sim, ctx.y, len(ctx.y)
    cidx, cans = np.zeros(n, np.int64), np.zeros(n, np.int64)
    norm2, size = np.zeros(int(y.max()) + 1), np.zeros(int(y.max()) + 1, np.int64)
    rec = {key: np.zeros(n) for key in ("served", "correct", "eligible", "conf", "win", "near")}
    rec["feats"], seen, m = np.zeros((n, len(FEATS))), set(), 0
    for i in range(n):
        rec["eligible"][i], answer = y[i] in seen, int(y[i])
        seen.add(answer)
        if m:
            sims = sim[i, cidx[:m]]
            win, best, f = features(sims, cans[:m], norm2, size)
            rec["feats"][i], rec["win"][i], rec["near"][i] = f, win, cidx[best]
            rec["conf"][i] = c = conf(f, i, int(cidx[best]))
            if c >= thr:
                rec["served"][i], rec["correct"][i] = 1, win == y[i]
                if not add_served:
                    continue
                answer = win
            norm2[answer] += 2 * sims[cans[:m] == answer].sum()
        norm2[answer], size[answer], cidx[m], cans[m], m = norm2[answer] + 1, size[answer] + 1, i, answer, m + 1
    return rec


class PairScores:
    """Production pair-encoder verifier score (int8 stack, hard rules included) of (query, member), memoized."""

    def __init__(self) -> None:
        self.path = OUT / "pair_scores.json"
        self.memo: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.asked, self.computed, self.seconds = 0, 0, 0.0
        self._verifier: Any = None

    def __call__(self, a: str, b: str, cos: float) -> float:
        self.asked += 1
        if (key := f"{a}\t{b}") not in self.memo:
            if self._verifier is None:
                from frugalstream.llm.pair_encoder import CrossEncoderVerifier

                self._verifier = CrossEncoderVerifier.load(precision="int8", threads=2)
            start = time.perf_counter()
            self.memo[key] = float(self._verifier.score_batch([(a, b, cos)])[0])
            self.computed, self.seconds = self.computed + 1, self.seconds + time.perf_counter() - start
        return self.memo[key]


class Logistic:
    """Logistic model over the cluster features (+ logit of the pair-encoder score), on standardized inputs."""

    def __init__(self, use_pe: bool) -> None:
        self.use_pe, self.w, self.b, self.mu, self.sd = use_pe, np.zeros(0), 0.0, np.zeros(0), np.ones(0)

    def design(self, f: F64, pe: F64 | None = None) -> F64:
        f = np.atleast_2d(f)
        cols = [f[:, :8], f[:, [0]] - f[:, [1]], f[:, [4]] - f[:, [5]], f[:, [7]] - f[:, [8]]]
        if self.use_pe and pe is not None:
            cols.append(np.log(np.clip(pe, 1e-4, 1 - 1e-4) / (1 - np.clip(pe, 1e-4, 1 - 1e-4)))[:, None])
        return np.hstack(cols)

    def fit(self, f: F64, correct: F64, pe: F64 | None = None) -> Logistic:
        from sklearn.linear_model import LogisticRegression

        x = self.design(f, pe)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-9
        model = LogisticRegression(C=1.0, max_iter=5000).fit((x - self.mu) / self.sd, correct)
        self.w, self.b = model.coef_[0], float(model.intercept_[0])
        return self

    def prob(self, f: F64, pe: float | None = None) -> float:
        x = (self.design(f, None if pe is None else np.array([pe]))[0] - self.mu) / self.sd
        return float(1.0 / (1.0 + np.exp(-(x @ self.w + self.b))))


def fit_models(tune: list[Ctx], pairs: PairScores) -> tuple[Logistic, Logistic]:
    """Fit on tuning streams only. Rows: a replay pass (every question cached with its true answer) and miss-only
    runs of the replay-fit model (m>=2) at p >= 0.9/0.97/0.99, whose clusters are sparser. Label: winner right."""
    def rows(runs: list[tuple[Ctx, dict[str, F64]]]) -> tuple[F64, F64]:
        return (np.vstack([r["feats"][1:] for _, r in runs]),
                np.concatenate([(r["win"] == c.y)[1:] for c, r in runs]).astype(float))

    replay = [(c, simulate(c, lambda f, i, j: 0.0, np.inf, False)) for c in tune]
    lr0 = Logistic(use_pe=False).fit(*rows(replay))
    runs = [(c, simulate(c, lambda f, i, j: lr0.prob(f) if f[6] >= LOG2 else 0.0, t, False))
            for t in (0.9, 0.97, 0.99) for c in tune]
    lr = Logistic(use_pe=False).fit(*rows(replay + runs))
    gated = [(c, r, i, int(r["near"][i])) for c, r in replay for i in range(1, len(c.y))
             if r["feats"][i, 6] >= LOG2 and lr.prob(r["feats"][i]) >= PE_GATE]
    pe = np.array([pairs(c.texts[i], c.texts[j], float(c.sim[i, j])) for c, _, i, j in gated])
    lr_pe = Logistic(use_pe=True).fit(np.array([r["feats"][i] for _, r, i, _ in gated]),
                                      np.array([float(r["win"][i] == c.y[i]) for c, r, i, _ in gated]), pe)
    return lr, lr_pe


def make_rules(lr: Logistic, lr_pe: Logistic, pairs: PairScores) -> dict[str, Callable[[Ctx], Conf]]:
    """Each rule maps a stream to conf(features, query pos, nearest winning member pos) -> one scalar."""
    def with_pe(ctx: Ctx) -> Conf:
        def conf(f: F64, i: int, j: int) -> float:
            if f[6] < LOG2 or lr.prob(f) < PE_GATE:  # only plausible hits pay for the pair encoder
                return 0.0
            return lr_pe.prob(f, pairs(ctx.texts[i], ctx.texts[j], float(ctx.sim[i, j])))
        return conf

    return {"all3 (baseline)": lambda ctx: lambda f, i, j: float(f[9]),
            "vote share*top": lambda ctx: lambda f, i, j: float(f[2] * f[0]),
            "vote share*top m>=2": lambda ctx: lambda f, i, j: float(f[2] * f[0]) if f[6] >= LOG2 else 0.0,
            "centroid margin": lambda ctx: lambda f, i, j: float(f[4] - f[5]),
            "centroid margin m>=2": lambda ctx: lambda f, i, j: float(f[4] - f[5]) if f[6] >= LOG2 else -1.0,
            "logistic": lambda ctx: lambda f, i, j: lr.prob(f),
            "logistic m>=2": lambda ctx: lambda f, i, j: lr.prob(f) if f[6] >= LOG2 else 0.0,
            "logistic+pair m>=2": with_pe}


def totals(recs: list[dict[str, F64]]) -> dict[str, float]:
    served, correct = sum(r["served"].sum() for r in recs), sum(r["correct"].sum() for r in recs)
    elig = sum(r["eligible"].sum() for r in recs)
    return {"recall": float(correct / elig), "fh": float((served - correct) / max(served, 1)), "served": int(served)}


Curve = dict[float, dict[str, dict[str, float]]]


def sweep(groups: dict[str, list[Ctx]], conf_of: Callable[[Ctx], Conf], grid: list[float], add: bool) -> Curve:
    """Per threshold, per dataset: pooled recall/FH; refined by 4 bisections at the FH_MAX crossing."""
    out: Curve = {}

    def run(t: float) -> bool:
        out[t] = {g: totals([simulate(c, conf_of(c), t, add) for c in cs]) for g, cs in groups.items()}
        return max(v["fh"] for v in out[t].values()) <= FH_MAX

    ok = {t: run(t) for t in sorted(set(grid))}
    if feasible := [t for t in ok if ok[t]]:
        hi = min(feasible)
        if (lo := max([t for t in ok if t < hi], default=None)) is not None:
            for _ in range(4):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if run(mid) else (mid, hi)
    return dict(sorted(out.items()))


def pick(curve: Curve) -> float:
    """Threshold with the best mean recall whose FH <= FH_MAX on every dataset (inf if none)."""
    ok = [(float(np.mean([v["recall"] for v in res.values()])), -t) for t, res in curve.items()
          if max(v["fh"] for v in res.values()) <= FH_MAX]
    return -max(ok)[1] if ok else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--grid", type=int, default=14, help="coarse thresholds per rule (quantiles of tuning scores)")
    ap.add_argument("--rules", default="", help="only rules whose name contains this")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    ctx = contexts(args.data)
    tune = {g: ctx[g] for g in ("clinc_train", "banking77")}
    pairs = PairScores()
    lr, lr_pe = fit_models([c for g in tune.values() for c in g], pairs)
    names = (*FEATS[:8], "top-top_other", "cent-cent_other", "mean_q-intra")
    res: dict[str, Any] = {"logistic": {"names": names, "weights": lr.w.tolist(), "bias": lr.b,
                                        "mean": lr.mu.tolist(), "std": lr.sd.tolist()},
                           "logistic_pair": {"weights": lr_pe.w.tolist(), "bias": lr_pe.b}, "rules": {}}
    print("logistic weights (standardized):", dict(zip(names, lr.w.round(3).tolist(), strict=True)),
          f"bias {lr.b:.3f}; with the pair encoder, its weight: {lr_pe.w[-1]:.3f}")
    print(f"{'rule':21s} {'policy':10s} {'thr':>7s} {'tune R/FH clinc_train; banking77':>32s} {'CLINC val R/FH':>14s}"
          f" {'val seeds1-4':>12s} {'snips R/FH (served)':>19s} {'val oracle':>10s} {'us/q':>5s} {'pairs/q':>7s}")
    replay = [(c, simulate(c, lambda f, i, j: 0.0, np.inf, False)) for g in tune.values() for c in g]
    for rule, conf_of in make_rules(lr, lr_pe, pairs).items():
        if args.rules not in rule:
            continue
        scores = np.array([conf_of(c)(r["feats"][i], i, int(r["near"][i])) for c, r in replay
                           for i in range(1, len(c.y))])
        grid = np.quantile(scores[scores > 0], 1 - np.geomspace(0.7, 0.001, args.grid)).tolist()
        res["rules"][rule] = {}
        for policy, add in (("miss-only", False), ("add-served", True)):
            curve = sweep(tune, conf_of, grid, add)
            thr = pick(curve)
            val_curve = sweep({"clinc_val": ctx["clinc_val"]}, conf_of, [*curve, thr], add)
            start, asked = time.perf_counter(), pairs.asked
            val = totals([simulate(c, conf_of(c), thr, add) for c in ctx["clinc_val"]])
            us = (time.perf_counter() - start) / len(ctx["clinc_val"][0].y) * 1e6
            pq = (pairs.asked - asked) / len(ctx["clinc_val"][0].y)
            more = totals([simulate(c, conf_of(c), thr, add) for c in ctx["clinc_val_reshuffled"]])
            snips = totals([simulate(c, conf_of(c), thr, add) for c in ctx["snips"]])
            oracle = max([v["clinc_val"]["recall"] for v in val_curve.values() if v["clinc_val"]["fh"] <= FH_MAX],
                         default=0.0)
            tr = curve.get(thr, {g: {"recall": 0.0, "fh": 0.0, "served": 0} for g in tune})
            res["rules"][rule][policy] = {
                "threshold": thr if thr < np.inf else None, "tuning": tr, "clinc_val": val,
                "clinc_val_seeds_1_4": more, "snips": snips, "clinc_val_oracle_recall_at_fh_1pct": oracle,
                "us_per_query_without_pair_encoder": us, "pair_calls_per_query": pq,
                "tuning_curve": {str(t): v for t, v in curve.items()},
                "clinc_val_curve": {str(t): v["clinc_val"] for t, v in val_curve.items()}}
            tune_s = "; ".join(f"{tr[g]['recall']:.3f}/{tr[g]['fh']:.3f}" for g in tune)
            sn = f"{snips['recall']:.3f}/{snips['fh']:.3f} ({snips['served']:3d})"
            print(f"{rule:21s} {policy:10s} {thr:7.4f} {tune_s:>32s} {val['recall']:.3f}/{val['fh']:.3f}    "
                  f"{more['recall']:.3f}/{more['fh']:.3f} {sn:>19s} {oracle:10.3f} {us:5.0f} {pq:7.2f}", flush=True)
        pairs.path.write_text(json.dumps(pairs.memo))
    res["pair_encoder"] = {"computed": pairs.computed, "ms_per_pair": 1e3 * pairs.seconds / max(pairs.computed, 1)}
    (OUT / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
