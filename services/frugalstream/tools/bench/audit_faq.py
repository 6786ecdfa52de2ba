"""`frugalstream bench audit --stream`: one tenant's FAQ traffic replayed through the production dedupe path
with audits and calibration on, against the labelled simulated provider.

Each question goes through `Deduper.handle` (exact store, verified semantic index with the tenant's live
threshold). A miss is answered by `LabelledProvider` (the label's canonical answer) and fed back as the model's
answer, which fills the cache and yields the near-miss free labels. Sampled semantic hits get the baseline
model's answer (the gateway's job, run here on the same provider). Every audit is judged by the `Auditor`
(the audit service's logic) and its threshold changes go into the deduper's live book, as `llm.thresholds`
would. Spend is priced by the production accountant code (`price_usage`) from the same usage records the
services emit, audit spend included.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from frugalstream.audit.logic import Auditor
from frugalstream.dedupe.results import Answer, Audit, Dispatch
from frugalstream.dedupe.wiring import build_deduper
from frugalstream.llm.audits import audit_usage
from frugalstream.llm.cache_keys import cache_keys, clean_text
from frugalstream.llm.embedder import encode_vector
from frugalstream.llm.judges import Judge, MatchJudge, normalize
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import price_usage
from frugalstream.llm.providers.labelled import LabelledProvider
from frugalstream.llm.usage import llm_usage
from frugalstream.resources import Resources
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, LLMResponse, Route, RoutedRequest, SamplingParams
from frugalstream.schemas.audits import AuditAnswer, AuditRequest, Knob

TENANT = "bench"


@dataclass
class Tally:
    requests: int = 0
    cache_served: int = 0
    semantic_hits: int = 0
    wrong_served: int = 0
    wrong_semantic: int = 0
    cluster_hits: int = 0
    wrong_cluster: int = 0
    correct_served: int = 0
    recallable: int = 0
    audits: int = 0
    gross_saved: float = 0.0
    audit_spend: float = 0.0
    thresholds: list[dict[str, Any]] = field(default_factory=list)


def routed_request(i: int, text: str, settings: Settings, vector: str | None) -> RoutedRequest:
    request = LLMRequest(id=f"q{i}", tenant=TENANT, messages=(ChatMessage(role="user", content=text),),
                         sampling=SamplingParams(temperature=0))
    small = settings.tiers.for_tier("small")[0]
    route = Route(task_type="faq", tier="small", model=small, provider="simulated", reason="bench",
                  input_tokens=len(text.split()) + 8, full_input_tokens=len(text.split()) + 8,
                  baseline_model=settings.default_baseline_model)
    return RoutedRequest(request=request, route=route, keys=cache_keys(request, "small"), routed_at=time.time(),
                         embedding=vector)


async def replay_faq(rows: list[tuple[str, str]], settings: Settings, seed: int, *,
                     progress: Any = None) -> dict[str, Any]:
    rng = random.Random(seed)
    rows = rows[:]
    rng.shuffle(rows)
    provider = LabelledProvider(faq=dict(rows))
    res = Resources(settings)
    catalog = PriceCatalog.load()
    deduper = build_deduper(settings, res.embedder, res.verifier)
    judges: dict[str, Judge] = {"match": MatchJudge()}
    auditor = Auditor(settings, judges, book=deduper.thresholds)
    vectors = await res.embedder.embed([clean_text(t) for t, _ in rows])
    tally = Tally()
    seen_labels: set[str] = set()
    started = time.perf_counter()
    try:
        for i, (text, label) in enumerate(rows):
            routed = routed_request(i, text, settings, encode_vector(vectors[i]))
            tally.requests += 1
            recallable = label in seen_labels
            tally.recallable += recallable
            seen_labels.add(label)
            decisions = await deduper.handle(requests=[(routed, 0)])
            audits: list[AuditRequest] = [d.request for d in decisions if isinstance(d, Audit)]
            for d in decisions:
                if isinstance(d, Answer):
                    _served(tally, d, provider, text, catalog, recallable)
                elif isinstance(d, Dispatch):
                    response, cost_saved = await _answer(provider, d.routed, catalog)
                    tally.gross_saved += cost_saved
                    fed = await deduper.handle(answers=[(response, 0)])
                    audits += [f.request for f in fed if isinstance(f, Audit)]
            await _judge(auditor, [await _fill(a, provider, catalog, tally) for a in audits], tally, i)
            if progress is not None and (i + 1) % 500 == 0:
                progress(i + 1, len(rows), time.perf_counter() - started)
    finally:
        res.close()
    return _result(tally, auditor)


def _served(tally: Tally, d: Answer, provider: LabelledProvider, text: str, catalog: PriceCatalog,
            recallable: bool) -> None:
    tally.cache_served += 1
    semantic = d.response.source == "cache_semantic"
    tally.semantic_hits += semantic
    right = normalize(d.response.content or "") == normalize(provider.answer("any", text))
    tally.wrong_served += not right
    tally.wrong_semantic += semantic and not right
    cluster = semantic and d.rule == "answer_cluster"
    tally.cluster_hits += cluster
    tally.wrong_cluster += cluster and not right
    tally.correct_served += right and recallable
    tally.gross_saved += price_usage(d.usage, catalog).saved_usd


async def _answer(provider: LabelledProvider, routed: RoutedRequest, catalog: PriceCatalog,
                  ) -> tuple[LLMResponse, float]:
    request = routed.request
    c = await provider.complete(model=routed.route.model, messages=request.messages, sampling=request.sampling)
    response = LLMResponse(request_id=request.id, tenant=request.tenant, source="llm", content=c.content,
                           model=c.model, tier=routed.route.tier, task_type=routed.route.task_type,
                           finish_reason="stop", usage=c.usage, keys=routed.keys, cacheable=True, simulated=True,
                           responded_at=time.time())
    usage = llm_usage(routed, c.model, c.usage, simulated=True)
    return response, price_usage(usage, catalog).saved_usd


async def _fill(audit: AuditRequest, provider: LabelledProvider, catalog: PriceCatalog,
                tally: Tally) -> AuditRequest:
    """What the gateway does for an audit with a job: the baseline's answer, billed as audit spend."""
    if audit.job is None:
        return audit
    job = audit.job
    c = await provider.complete(model=job.route.model, messages=job.request.messages, sampling=job.request.sampling)
    tally.audit_spend += price_usage(audit_usage(job, c.model, c.usage, simulated=True), catalog).actual_cost_usd
    return audit.model_copy(update={"reference": AuditAnswer(content=c.content, model=c.model), "job": None})


async def _judge(auditor: Auditor, audits: list[AuditRequest], tally: Tally, step: int) -> None:
    if not audits:
        return
    records, changes = await auditor.judge(audits)
    tally.audits += sum(1 for r in records if r.kind == "cache_semantic")
    for c in changes:
        tally.thresholds.append({"request": step + 1, "knob": c.knob, "value": c.value, "previous": c.previous,
                                 "reason": c.reason, "n": c.n, "low": c.low})


def _result(tally: Tally, auditor: Auditor) -> dict[str, Any]:
    cell = auditor.estimates.estimate((TENANT, "faq", "cache_semantic"))
    share = tally.semantic_hits / tally.cache_served if tally.cache_served else 0.0
    # The audits estimate the semantic hits' error rate; exact hits replay the same question's own answer.
    estimate = (1 - cell.rate) * share if cell.n else None
    return {
        "requests": tally.requests, "cache_served": tally.cache_served, "semantic_hits": tally.semantic_hits,
        "true_false_hit_rate": tally.wrong_served / tally.cache_served if tally.cache_served else 0.0,
        "true_semantic_false_hit_rate": tally.wrong_semantic / tally.semantic_hits if tally.semantic_hits else 0.0,
        "estimated_false_hit_rate": estimate,
        "estimate_ci": [(1 - cell.high) * share, (1 - cell.low) * share] if cell.n else None,
        "audited_hits": cell.n,
        "recall": tally.correct_served / tally.recallable if tally.recallable else 0.0,
        "audit_spend_usd": tally.audit_spend, "gross_savings_usd": tally.gross_saved,
        "audit_cost_share": tally.audit_spend / tally.gross_saved if tally.gross_saved else None,
        "final_threshold": auditor.current(TENANT, "faq", "semantic_verify"),
        "final_cluster_threshold": auditor.current(TENANT, "faq", "answer_cluster"),
        "cluster_hits": tally.cluster_hits, "wrong_cluster_hits": tally.wrong_cluster,
        "labels": {knob: _label_counts(auditor, knob) for knob in ("semantic_verify", "answer_cluster")},
        "thresholds": tally.thresholds,
    }


def _label_counts(auditor: Auditor, knob: Knob) -> dict[str, int]:
    """The controller's labels of one knob: how many, and how many the judge rejected."""
    labels = auditor.controller.labels(TENANT, "faq", knob)
    return {"n": len(labels), "rejected": sum(not lb.accepted for lb in labels)}
