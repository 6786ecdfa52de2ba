"""`frugalstream bench audit`: do audits estimate the truth, and do the thresholds they move hold the target?

`--stream`: a labelled FAQ stream (see `frugalstream.tools.bench.audit_faq`). `--routing`: routing outcome data
(prompt, weak model right?, strong model right?). Each prompt is scored by the shipped router (rows it was
trained on are never used: the held-out hash half with the router variant that never saw it); a score under
the tenant's live `route_mid` threshold goes to the cheapest tier (the weak model), the others to the strong
one. Sampled routed-down answers get the strong model's answer, sampled routed-up ones the weak model's, and
the LLM judge (the labelled provider grades from the labels) rates each: accounted as audit spend. The
`Auditor` estimates acceptance and moves the threshold to hold `--target-quality`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from frugalstream.runtime.settings import Settings, UsageError

TENANT = "bench"


def _progress(done: int, total: int, elapsed: float) -> None:
    print(f"  {done}/{total} requests, {elapsed:.0f} s", file=sys.stderr, flush=True)


def load_stream(path: Path, text_col: str, label_col: str, split: str | None = None) -> list[tuple[str, str]]:
    """.csv / .jsonl with text and label columns, or a .json of splits (`{split: [[text, label], ...]}`, as
    CLINC150 ships) read with `split`; there an `oos` label (out of scope) is no shared answer: each its own."""
    from frugalstream.tools.bench.dedupe import load_intents
    if not path.exists():
        raise UsageError(f"--stream {path}: no such file")
    try:
        if path.suffix == ".json":
            splits = json.loads(path.read_text(encoding="utf-8"))
            if split not in splits:
                raise UsageError(f"--stream {path}: give --split, one of {sorted(splits)}")
            return [(str(text), f"oos-{i}" if label == "oos" else str(label))
                    for i, (text, label) in enumerate(splits[split])]
        rows = load_intents(path, text_col, label_col)
    except KeyError as exc:
        raise UsageError(f"--stream {path}: no column {exc} (use --text-col and --label-col)") from exc
    if not rows:
        raise UsageError(f"--stream {path}: no rows")
    return rows


async def replay_routing(rows: list[tuple[str, bool, bool]], scores: list[float], settings: Settings,
                         seed: int, audit_rate: float) -> dict[str, Any]:
    from frugalstream.audit import quality
    from frugalstream.audit.logic import Auditor
    from frugalstream.llm.audits import audit_id, sampled
    from frugalstream.llm.judges import llm_grade_messages, llm_judge_messages, parse_llm_verdict
    from frugalstream.llm.pricing.catalog import PriceCatalog
    from frugalstream.llm.providers.labelled import LabelledProvider
    from frugalstream.schemas import ChatMessage, CostPoint, SamplingParams, TokenUsage
    from frugalstream.schemas.audits import AuditAnswer, AuditRequest, DecisionKind

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    weak, strong, judge_model = (settings.tiers.for_tier("small")[0], settings.default_baseline_model,
                                 settings.audit_judge_model)
    provider = LabelledProvider(outcomes={p: (w, s) for p, w, s in rows}, weak_models=(weak,))
    catalog = PriceCatalog.load()
    auditor = Auditor(settings, {})
    plain = SamplingParams(temperature=0)

    def cost(model: str, usage: TokenUsage) -> float:
        return float(catalog.price(CostPoint(model=model, usage=usage)))

    async def call(model: str, text: str) -> tuple[str, float]:
        c = await provider.complete(model=model, messages=(ChatMessage(role="user", content=text),), sampling=plain)
        return c.content, cost(model, c.usage)

    spent = strong_cost = audit_spend = 0.0
    served_right = strong_right = down = down_ok = 0
    snapshot: dict[str, Any] | None = None
    thresholds: list[dict[str, Any]] = []
    for step, i in enumerate(order):
        prompt, w_ok, s_ok = rows[i]
        t = auditor.current(TENANT, "chat", "route_mid")
        strong_answer, strong_price = await call(strong, prompt)
        strong_cost += strong_price
        strong_right += s_ok
        routed_down = scores[i] < t
        kind: DecisionKind = "routed_down" if routed_down else "routed_up"
        answer, price = await call(weak, prompt) if routed_down else (strong_answer, strong_price)
        spent += price
        served_right += w_ok if routed_down else s_ok
        if routed_down:
            down += 1
            down_ok += bool(w_ok or not s_ok)
        if not sampled(TENANT, f"r{i}", kind, audit_rate):
            continue
        other, other_price = (strong_answer, strong_price) if routed_down else await call(weak, prompt)
        candidate, reference = (answer, other) if routed_down else (other, answer)
        verdict_text, judge_price = await call(judge_model, llm_judge_messages(prompt, candidate, reference)[1].content)
        audit_spend += other_price + judge_price
        grades: dict[str, Any] = {}
        if settings.audit_quality_target is not None:  # quality retained: each answer graded alone as well
            for field_name, text in (("candidate_grade", candidate), ("reference_grade", reference)):
                grade_text, grade_price = await call(judge_model, llm_grade_messages(prompt, text)[1].content)
                audit_spend += grade_price
                grades[field_name] = parse_llm_verdict(grade_text)
        audit = AuditRequest(audit_id=audit_id(TENANT, f"r{i}", kind), tenant=TENANT, request_id=f"r{i}", kind=kind,
                             task_type="chat", tier="small" if routed_down else "large", question=prompt[:2000],
                             score=scores[i], threshold=t, candidate=AuditAnswer(content=candidate),
                             reference=AuditAnswer(content=reference), judge_verdict=parse_llm_verdict(verdict_text),
                             sampled_at=time.time(), **grades)
        _, changes = await auditor.judge([audit])
        thresholds += [{"request": step + 1, "value": c.value, "previous": c.previous, "reason": c.reason,
                        "n": c.n, "low": c.low} for c in changes]
        cell = auditor.estimates.estimate((TENANT, "chat", "routed_down"))
        if snapshot is None and cell.n >= 500:
            snapshot = {"audits": cell.n, "estimated_acceptance": cell.rate, "estimate_ci": [cell.low, cell.high],
                        "true_acceptance": down_ok / down if down else None, "request": step + 1}
    cell = auditor.estimates.estimate((TENANT, "chat", "routed_down"))
    labels = [lb.graded() for lb in auditor.controller.labels(TENANT, "chat", "route_mid")]
    kept = quality.at(quality.curve(labels), auditor.current(TENANT, "chat", "route_mid")) if labels else None
    # the truth at the final threshold over the whole stream (what the estimate is an estimate of)
    final_t = auditor.current(TENANT, "chat", "route_mid")
    final_right = sum((w if scores[i] < final_t else s) for i, (_, w, s) in enumerate(rows))
    return {
        "requests": len(rows), "routed_down": down, "true_acceptance": down_ok / down if down else None,
        "estimated_acceptance": cell.rate if cell.n else None, "estimate_ci": [cell.low, cell.high],
        "audited_routed_down": cell.n, "after_500_audits": snapshot,
        "cost_reduction": 1 - spent / strong_cost if strong_cost else None,
        "cost_reduction_net_of_audits": 1 - (spent + audit_spend) / strong_cost if strong_cost else None,
        "audit_cost_share": audit_spend / (strong_cost - spent) if strong_cost > spent else None,
        "quality_retained": served_right / strong_right if strong_right else None,
        "estimated_quality_retained_final": kept.rate if kept else None,
        "estimated_quality_retained_ci": [kept.low, kept.high] if kept else None,
        "true_quality_retained_final": final_right / strong_right if strong_right else None,
        "routed_down_share_final": sum(sc < final_t for sc in scores) / len(scores) if scores else None,
        "quality_target": settings.audit_quality_target, "acceptance_target": settings.audit_acceptance_target,
        "final_threshold": auditor.current(TENANT, "chat", "route_mid"), "thresholds": thresholds,
    }


def _settings(args: argparse.Namespace) -> Settings:
    # One rate for every kind (near misses stay free and all used), so the labels' weights match the sampling.
    overrides: dict[str, Any] = {"audit_rate": args.audit_rate, "audit_judges": {"default": "match"},
                                 "audit_rates": {"near_miss": 1.0, "routed_up": args.audit_rate}}
    if args.target_false_hit is not None:
        overrides["audit_false_hit_target"] = args.target_false_hit
    if args.target_quality is not None:
        overrides["audit_quality_target"] = args.target_quality
    if args.target_acceptance is not None:
        overrides["audit_acceptance_target"] = args.target_acceptance
    if args.start_threshold is not None:  # where the tenant's routing threshold starts (default: shipped)
        overrides["route_threshold_mid"] = args.start_threshold
    return Settings(**overrides)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if (args.stream is None) == (args.routing is None):
        raise UsageError("give exactly one of --stream FILE or --routing FILE")
    settings = _settings(args)
    started = time.perf_counter()
    if args.stream is not None:
        from frugalstream.tools.bench.audit_faq import replay_faq
        rows = load_stream(Path(args.stream), args.text_col, args.label_col, args.split)[: args.limit]
        result = asyncio.run(replay_faq(rows, settings, args.seed, progress=_progress))
        result["mode"] = "stream"
    else:
        result = _run_routing(args, settings)
    result.update(dataset=str(args.stream or args.routing), seed=args.seed, audit_rate=args.audit_rate,
                  wall_s=round(time.perf_counter() - started, 1))
    return result


def _run_routing(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from frugalstream.llm.embedder import MiniLMEmbedder
    from frugalstream.tools.evals.route_eval import (
        find_contaminated_files,
        honest_router_and_mask,
        load_contaminated,
        load_route_csv,
    )
    path = Path(args.routing)
    if not path.exists():
        raise UsageError(f"--routing {path}: no such file")
    try:
        rows = load_route_csv(path, args.prompt_col, args.weak_col, args.strong_col,
                              load_contaminated(find_contaminated_files(path)))
    except KeyError as exc:
        raise UsageError(f"--routing {path}: no column {exc} (use --prompt-col, --weak-col, --strong-col)") from exc
    router, mask, note = honest_router_and_mask([r[0] for r in rows])
    kept = [r for r, keep in zip(rows, mask, strict=True) if keep]
    random.Random(args.seed).shuffle(kept)
    kept = kept[: args.limit]
    texts = [r[0] for r in kept]
    print(f"embedding {len(texts)} prompts ({note})", file=sys.stderr, flush=True)
    scores = router.score(MiniLMEmbedder(max_seq_tokens=256).embed(texts), texts)
    result = asyncio.run(replay_routing(kept, [float(s) for s in scores], settings, args.seed, args.audit_rate))
    result.update(mode="routing", rows_note=note)
    return result


def print_table(result: dict[str, Any]) -> None:
    keys = [k for k, v in result.items() if not isinstance(v, list | dict)]
    width = max(len(k) for k in keys)
    for k in keys:
        v = result[k]
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    for k in ("estimate_ci", "estimated_quality_retained_ci", "after_500_audits"):
        if result.get(k) is not None:
            print(f"{k:<{width}}  {result[k]}")
    print(f"{'threshold changes':<{width}}  {len(result.get('thresholds', []))}")


def add_audit_bench(kinds: Any) -> None:
    p = kinds.add_parser("audit", help="audits and calibrated thresholds on labelled traffic (FAQ or routing)")
    p.add_argument("--stream", help="labelled FAQ stream (.csv or .jsonl)")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--split", help="for a .json stream of splits (CLINC150's data_full.json): which split")
    p.add_argument("--routing", help="routing outcome data (.csv: prompt, weak right?, strong right?)")
    p.add_argument("--prompt-col", default="prompt")
    p.add_argument("--weak-col", default="mistralai/Mixtral-8x7B-Instruct-v0.1")
    p.add_argument("--strong-col", default="gpt-4-1106-preview")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audit-rate", type=float, default=0.05, help="share of each saving audited")
    p.add_argument("--target-false-hit", type=float, default=None, help="false-hit bound (default: the setting)")
    p.add_argument("--target-quality", type=float, default=None,
                   help="quality retained against always-strong that routing must hold")
    p.add_argument("--target-acceptance", type=float, default=None,
                   help="routed-down acceptance target (used when no --target-quality)")
    p.add_argument("--start-threshold", type=float, default=None,
                   help="routing: the tenant's route_mid threshold at the start (default: the shipped one)")
    p.add_argument("--limit", type=int, default=3000, help="requests replayed (default: %(default)s)")
    p.add_argument("--json", required=True, help="write the result here")

    def go(args: argparse.Namespace) -> int:
        if not 0 <= args.audit_rate <= 1:
            raise UsageError(f"--audit-rate {args.audit_rate}: must be within [0, 1]")
        result = run(args)
        print_table(result)
        Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    p.set_defaults(func=go)
