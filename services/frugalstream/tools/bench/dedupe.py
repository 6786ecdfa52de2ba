"""`frugalstream bench dedupe`: the semantic-hit decision path on labelled pairs, next to plain cosine.

Pair by pair, `text_a` is stored in an empty cache scope and `text_b` is looked up through the production
`SemanticIndex` (FAQ task type, one scope per pair, so every lookup sees exactly one cached answer). The
same run reports plain cosine >= 0.95, the rule most semantic caches use. `--shard-size N` also times
lookups on one shard of N entries, excluding the embedding, and, apart, the verifier's model on one real
candidate (the synthetic shard's texts differ in a number, so its rules veto before the model runs).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from frugalstream.dedupe.semantic import SemanticIndex
from frugalstream.dedupe.wiring import semantic_policy
from frugalstream.llm.cache_keys import clean_text
from frugalstream.llm.embedder import AsyncEmbedder, Vectors, decode_vector, encode_vector
from frugalstream.llm.verifier import Verifier
from frugalstream.resources import build_embedder, build_verifier
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, CacheKeys, ChatMessage, LLMRequest, Route, RoutedRequest
from frugalstream.tools.bench.models import add_model_arguments
from frugalstream.tools.evals.pair_eval import BASELINE_COSINE, Pair, load_paws, qqp_split


def load_pairs(path: Path, split: str | None) -> list[Pair]:
    """JSON lines with text_a, text_b, label; PAWS-style .tsv (sentence1, sentence2, label) also works."""
    if path.suffix == ".tsv":
        return load_paws(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split:
        rows = [r for r, s in zip(rows, qqp_split(rows), strict=True) if s == split]
    return [(r["text_a"], r["text_b"], int(r["label"])) for r in rows]


def load_intents(path: Path, text_col: str, label_col: str) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            return [(json.loads(line)[text_col], str(json.loads(line)[label_col])) for line in f if line.strip()]
        return [(r[text_col], r[label_col]) for r in csv.DictReader(f)]


def intent_pairs(rows: list[tuple[str, str]], vectors: Vectors, limit: int, seed: int) -> list[Pair]:
    """Half the questions are the cache; each other question is paired with its nearest cached one."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    cached, queries = order[: len(order) // 2], order[len(order) // 2:][:limit]
    sims = vectors[queries] @ vectors[cached].T
    nearest = sims.argmax(axis=1)
    return [(rows[cached[n]][0], rows[q][0], int(rows[cached[n]][1] == rows[q][1]))
            for q, n in zip(queries, nearest, strict=True)]


def _routed(i: int, text: str, vector: Vectors, scope: str | None = None) -> RoutedRequest:
    request = LLMRequest(id=f"b{i}", tenant="bench", messages=(ChatMessage(role="user", content=text),))
    keys = CacheKeys(scope=scope or f"pair-{i}", exact=f"q{i}", prefix="", lookup_text=clean_text(text), tier_rank=0)
    route = Route(task_type="faq", tier="small", model="m", provider="simulated", reason="bench", input_tokens=0,
                  full_input_tokens=0, baseline_model="m")
    return RoutedRequest(request=request, route=route, keys=keys, routed_at=0.0, embedding=encode_vector(vector))


def _entry(i: int, text: str, vector: Vectors, scope: str | None = None) -> CacheEntry:
    keys = CacheKeys(scope=scope or f"pair-{i}", exact=f"a{i}", prefix="", lookup_text=clean_text(text), tier_rank=0)
    # Its own answer: pairs say nothing about shared answers, so no answer cluster forms and the verifier is measured.
    return CacheEntry(keys=keys, request_id=f"a{i}", tenant="bench", content=f"answer {i}", model="m", output_tokens=1,
                      stored_at=time.time(), embedding=encode_vector(vector))


def _rates(hit: np.ndarray[Any, Any], label: np.ndarray[Any, Any]) -> dict[str, float | int]:
    tp, fp = int((hit & label).sum()), int((hit & ~label).sum())
    pos, neg = int(label.sum()), int((~label).sum())
    return {"hits": tp + fp, "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / pos if pos else 0.0,
            "false_hit_rate": fp / neg if neg else 0.0}


async def run_pairs(pairs: list[Pair], index: SemanticIndex, vec: dict[str, Vectors]) -> dict[str, Any]:
    await index.add([_entry(i, a, vec[a]) for i, (a, _, _) in enumerate(pairs)])
    hits = await index.match([_routed(i, b, vec[b]) for i, (_, b, _) in enumerate(pairs)])
    label = np.array([y == 1 for _, _, y in pairs])
    # The baseline sees the same float16-rounded vectors the production path receives.
    cos = np.array([float(decode_vector(encode_vector(vec[a])) @ decode_vector(encode_vector(vec[b])))
                    for a, b, _ in pairs])
    return {"pairs": len(pairs), "positives": int(label.sum()), "negatives": int((~label).sum()),
            **_rates(np.array([h is not None for h in hits]), label),
            "cosine_0.95": _rates(cos >= BASELINE_COSINE, label)}


def time_lookups(index: SemanticIndex, base: Vectors, size: int, queries: int, seed: int) -> dict[str, float]:
    """Lookup latency on one shard of `size` entries built from mixes of real embeddings, embedding excluded."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, len(base), size), rng.integers(0, len(base), size)
    w = rng.uniform(0.0, 1.0, (size, 1)).astype(np.float32)
    mixed = w * base[i] + (1 - w) * base[j]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    entries = [_entry(n, f"entry {n}", mixed[n], scope="big") for n in range(size)]
    index.add_vectors(entries, mixed)
    samples = []
    for n in range(queries):
        q = mixed[rng.integers(0, size)] + rng.normal(0, 0.02, mixed.shape[1]).astype(np.float32)
        q /= np.linalg.norm(q)
        req = _routed(n, f"entry {n}", q, scope="big")
        start = time.perf_counter()
        index.match_vectors([req], q.reshape(1, -1))
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {"shard_entries": size, "lookups": queries, "lookup_ms_p50": samples[len(samples) // 2],
            "lookup_ms_p99": samples[int(len(samples) * 0.99)]}


def time_verifier(verifier: Verifier, pairs: list[Pair], vec: dict[str, Vectors], n: int,
                  seed: int) -> dict[str, float]:
    """Latency of verifying one candidate (a real pair, one call each): the cost a lookup pays on top of
    the search when a candidate passes the recall cosine and no rule vetoes it."""
    sample = random.Random(seed).sample(pairs, min(n, len(pairs)))
    samples = []
    for a, b, _ in sample:
        cos = float(vec[a] @ vec[b])
        start = time.perf_counter()
        verifier.verify_batch([(b, a, cos, 0.5)])
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    batch = [(b, a, float(vec[a] @ vec[b]), 0.5) for a, b, _ in sample[:64]]
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        verifier.verify_batch(batch)
        rounds.append((time.perf_counter() - start) * 1000 / len(batch))
    return {"verify_ms_p50": samples[len(samples) // 2], "verify_ms_p99": samples[int(len(samples) * 0.99)],
            "verify_ms_per_pair_in_batch_of_64": sorted(rounds)[1]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(semantic_verifier=args.verifier, model_precision=args.precision,
                        embed_max_tokens=args.max_tokens)
    embedder = AsyncEmbedder(build_embedder(settings))
    verifier = build_verifier(settings)
    index = SemanticIndex(embedder, verifier, semantic_policy(settings))
    try:
        if args.pairs:
            pairs = load_pairs(Path(args.pairs), args.split)
        else:
            rows = load_intents(Path(args.intents), args.text_col, args.label_col)
            vectors = await embedder.embed([r[0] for r in rows])
            pairs = intent_pairs(rows, vectors, args.limit or 3000, args.seed)
        if args.limit:
            pairs = pairs[: args.limit]
        texts = sorted({t for a, b, _ in pairs for t in (a, b)})
        started = time.perf_counter()
        vectors = await embedder.embed(texts)
        embed_s = time.perf_counter() - started
        vec = dict(zip(texts, vectors, strict=True))
        started = time.perf_counter()
        result = await run_pairs(pairs, index, vec)
        result.update(source=args.pairs or args.intents, split=args.split, verifier=args.verifier,
                      model_precision=args.precision, max_tokens=args.max_tokens,
                      embed_s=round(embed_s, 1), decide_s=round(time.perf_counter() - started, 1))
        if args.shard_size:
            result["lookup"] = time_lookups(index, vectors, args.shard_size, 2000, args.seed)
            result["lookup"].update(time_verifier(verifier, pairs, vec, 300, args.seed))
        return result
    finally:
        index.close()
        embedder.close()


def cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if not (args.pairs or args.intents):
        raise SystemExit("give --pairs FILE or --intents FILE --text-col C --label-col C")
    result = asyncio.run(bench(args))
    table = Table(title=f"bench dedupe: {result['source']} ({result['pairs']} pairs)")
    for col in ("decision", "hits", "precision", "recall", "false_hit_rate"):
        table.add_column(col, justify="right" if col != "decision" else "left")
    for name, row in (("verified (production)", result), ("cosine >= 0.95", result["cosine_0.95"])):
        table.add_row(name, str(row["hits"]), f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                      f"{row['false_hit_rate']:.4f}")
    Console().print(table)
    if "lookup" in result:
        Console().print(result["lookup"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_dedupe_bench(kinds: Any) -> None:
    p = kinds.add_parser("dedupe", help="semantic dedupe precision/recall on labelled pairs or intents")
    p.add_argument("--pairs", help="JSON lines with text_a, text_b, label (or a PAWS .tsv)")
    p.add_argument("--split", choices=["train", "val", "dev"], help="QQP-style hash split of --pairs")
    p.add_argument("--intents", help="CSV (or JSON lines) of questions with intent labels")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="category")
    p.add_argument("--limit", type=int, help="use at most N pairs / queries")
    p.add_argument("--shard-size", type=int, help="also time lookups on one shard of N entries")
    p.add_argument("--verifier", choices=["cross_encoder", "features"], default="cross_encoder",
                   help="the semantic verifier (FRUGAL_SEMANTIC_VERIFIER in production)")
    p.add_argument("--seed", type=int, default=0)
    add_model_arguments(p)
    p.add_argument("--json", help="write the result as JSON")
    p.set_defaults(func=cmd)
