"""Audit sampling and the counterfactual call of an audit: which decisions are audited, under which id, what
the gateway runs for them and how their spend is accounted.

Sampling is a hash of (tenant, request id, kind) against the rate, so every stage and every redelivery agrees
on whether a decision is audited, without state. The hash is keyed by a server-side secret when one is set
(`audit_sampling_secret`): unkeyed, a producer can compute it and choose request ids that are never audited.
The audit's model call runs under the audit id, never the request id: its answer cannot be mistaken for (or
replayed as) the caller's, and a tenant whose request id happens to look like an audit id still gets a
different key (the id is a hash over the JSON identity).

Audit spend is a cost with no saving: its usage record starts from an empty baseline and its one step, the
`audit` strategy, is the call as billed, so the ledger's savings are net of it by construction.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from frugalstream.llm.identity import request_key, usage_id
from frugalstream.schemas import CostPoint, PricedStep, Route, RoutedRequest, TokenUsage, UsageRecord
from frugalstream.schemas.audits import AuditAnswer, DecisionKind

AUDIT_PREFIX = "audit-"


def audit_id(tenant: str, request_id: str, kind: DecisionKind, part: str | None = None) -> str:
    """`part` tells apart two audits of one kind on one request (a near miss of each lookup path)."""
    label = kind if part is None else f"{kind}\0{part}"
    digest = hashlib.sha256(f"{label}\0{request_key(tenant, request_id)}".encode()).hexdigest()
    return f"{AUDIT_PREFIX}{digest[:32]}"


def sample_point(tenant: str, request_id: str, kind: DecisionKind, key: bytes | None = None) -> float:
    """A uniform number in [0, 1) fixed by the decision's identity and, when set, the sampling secret `key`
    (an HMAC: without the key, no one can tell which ids are audited)."""
    message = f"sample\0{kind}\0{request_key(tenant, request_id)}".encode()
    digest = hmac.digest(key, message, "sha256") if key else hashlib.sha256(message).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def audit_rate(rates: Mapping[str, float], kind: DecisionKind, default: float) -> float:
    return min(max(rates.get(kind, default), 0.0), 1.0)


def sampled(tenant: str, request_id: str, kind: DecisionKind, rate: float, key: bytes | None = None) -> bool:
    """Every service that samples passes the same `key` (`Settings.audit_sampling_key`), so they all agree."""
    return rate > 0 and sample_point(tenant, request_id, kind, key) < rate


def paid_saving(route: Route) -> DecisionKind | None:
    """The saving a paid answer took, which a counterfactual on the full history audits: a cheaper model than
    the baseline (`routed_down`, trimmed or not), else a trimmed history (`trimmed`, also for a pinned model:
    the tenant chose the model, not the trim)."""
    if route.model != route.baseline_model and not route.pinned:
        return "routed_down"
    return "trimmed" if route.trimmed_messages else None


def audit_job(routed: RoutedRequest, kind: DecisionKind, model: str, tier: str | None = None) -> RoutedRequest:
    """The counterfactual call: the request as routed - on its full history when the classifier kept it for
    this audit (`audit_messages`) - run on `model`, with no fallback, no cache and no reply topic, under the
    audit id (its answer goes nowhere but `llm.audits.answered`)."""
    full = {"messages": routed.audit_messages} if routed.audit_messages is not None and kind != "routed_up" else {}
    request = routed.request.model_copy(update={
        "id": audit_id(routed.request.tenant, routed.request.id, kind), "reply_topic": None,
        "cache": routed.request.cache.model_copy(update={"policy": "no-store", "shared_scope": None}), **full,
    })
    route = routed.route.model_copy(update={
        "model": model, "fallbacks": (), "tier": tier or routed.route.tier, "pinned": True,
        "reason": f"audit {kind}",
    })
    return routed.model_copy(update={"request": request, "route": route, "coalesced_with": (), "audit_messages": None})


def audit_usage(job: RoutedRequest, model: str, usage: TokenUsage, *, simulated: bool,
                part: str = "call") -> UsageRecord:
    """The audit's spend: nothing saved, everything billed, attributed to the `audit` strategy."""
    tenant = job.request.tenant
    return UsageRecord(
        id=usage_id(f"audit-{part}", tenant, job.request.id), request_id=job.request.id, tenant=tenant,
        stage="audit", task_type=job.route.task_type, tags={}, source="llm",
        baseline=CostPoint(model=job.route.baseline_model, usage=TokenUsage(estimated=True)),
        steps=(PricedStep(strategy="audit", model=model, usage=usage),), actual_model=model,
        occurred_at=time.time(), simulated=simulated,
    )


def answers_digest(candidate: AuditAnswer, reference: AuditAnswer) -> str:
    """What a reviewer's verdict is tied to: the exact pair of texts shown."""
    h = hashlib.sha256()
    for text in (candidate.content, reference.content):
        data = text.encode()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
