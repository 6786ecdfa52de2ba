"""The gateway's part of audits: sample its own savings, and run the counterfactual calls of every audit.

Sampling (on paid answers): a request routed below its baseline model is `routed_down` (its answer is the
candidate, the baseline model's the reference); one sent on its baseline (or pinned) model with a trimmed
history is `trimmed` (the reference: the same model). Either reference runs on the full history when the
request was trimmed (the classifier keeps it for the sampled ones, `llm.audits.paid_saving`). A request routed
above the cheapest tier is `routed_up` (the cheapest tier's answer is the candidate: could it have gone
cheaper?). A pinned request is audited for its trim only: the tenant chose the model.

Calls (`llm.audits.dispatch` -> `llm.audits.answered` + `llm.usage`): the job runs through the same `Gateway`
logic (providers, retries, breakers), under the audit id, on a gateway of its own whose paid-call memory is
in-process: its answers are never published on `llm.responses` nor any reply topic. Each call's usage is an
audit usage record (the `audit` strategy, nothing saved), including the LLM judge's call when the task type's
judge is `llm`. Usage follows the call, not the answer: it is emitted whenever the gateway's result carries
one, whatever the outcome, so a replay after a failed publish re-emits it (same deterministic usage id: the
ledger counts it once) and a paid answer turned into a `too_large` error is still billed. An audit whose call
fails is dropped with a log line and a metric (no verdict; a failed call carries no usage: it was not billed).

Policy walls (`skip_reason`): an audit sends the tenant's prompt to a model and bills the tenant for it, so
it runs only where the tenant's own request could have run: a model in `allowed_models` (when set) at or
below `max_tier` (often a data-residency or compliance limit, not a price), and, when a budget downgrade
capped the request, at or below the tier it was capped to. The routed_up audit takes the cheapest tier's
first model the tenant may use; any other audit whose model (or, with an `llm` judge, whose judge model: the
judge reads the prompt too) is walled off is skipped before its call, with an `audit_skipped` log line naming
the reason. A skipped audit is never published, so it is no label. Sampling applies the walls and the
dispatch applies them again (an audit sampled by dedupe, or before the policy changed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from frugalstream.gateway.idempotency import MemoryCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.audits import audit_id, audit_job, audit_rate, audit_usage, paid_saving, sampled
from frugalstream.llm.judges import DEFAULT_RUBRIC, llm_judge_messages, parse_llm_verdict
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.runtime.stage import BatchContext
from frugalstream.schemas import TIERS, CompletedCall, RoutedRequest, Tier, UsageRecord
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditAnswer, AuditRequest, DecisionKind

log = get_logger(__name__)


class InProcessCompleted:
    """Paid-call memory of audit calls (`CompletedCalls`): a redelivered audit in this process is not paid
    twice; after a restart it may be (its usage id is the same, so it is counted once)."""

    def __init__(self) -> None:
        self.memory = MemoryCompleted()

    async def lookup(self, partition: int, key: str) -> CompletedCall | None:
        return self.memory.get(partition, key)

    async def record(self, partition: int, call: CompletedCall) -> None:
        self.memory.put(partition, call)


def _sample(settings: Settings, routed: RoutedRequest, kind: DecisionKind) -> bool:
    rate = audit_rate(settings.audit_rates, kind, settings.audit_rate)
    return sampled(routed.request.tenant, routed.request.id, kind, rate, settings.audit_sampling_key())


def model_wall(settings: Settings, tenant: str, model: str, ceiling: Tier | None = None) -> str | None:
    """Why `tenant`'s prompt may not go to `model` (None: it may): the tenant's policy, or `ceiling`, the tier
    a budget downgrade capped the request to."""
    policy = settings.tenants.get(tenant, TenantPolicy())
    if policy.allowed_models is not None and model not in policy.allowed_models:
        return "model_not_allowed"
    rank = TIERS.index(settings.tiers.tier_of(model))
    if rank > TIERS.index(policy.max_tier):
        return "above_max_tier"
    if ceiling is not None and rank > TIERS.index(ceiling):
        return "above_budget_ceiling"
    return None


def judge_of(settings: Settings, task_type: str | None) -> str:
    judges = settings.audit_judges
    return judges.get(task_type or "", judges.get("default", "embedding"))


def skip_reason(settings: Settings, audit: AuditRequest) -> str | None:
    """Why `audit` must not run (None: it may): its call's model, or its LLM judge's, is walled off for its
    tenant. A judge that may not read the prompt leaves no verdict, so the call would be paid for nothing."""
    job = audit.job
    if job is None:
        return None
    ceiling = (audit.tier or job.route.tier) if job.route.downgraded_by_budget else None
    reason = model_wall(settings, audit.tenant, job.route.model, ceiling)
    if reason is None and judge_of(settings, audit.task_type) == "llm":
        judged = model_wall(settings, audit.tenant, settings.audit_judge_model, ceiling)
        reason = None if judged is None else f"judge_{judged}"
    if reason is not None:
        log.info("audit_skipped", audit_id=audit.audit_id, tenant=audit.tenant, kind=audit.kind, reason=reason)
    return reason


def sample_paid(settings: Settings, results: Iterable[Result]) -> list[Out]:
    """The audit requests of this batch's paid answers (keyed by tenant, like every audit topic)."""
    outs: list[Out] = []
    small = settings.tiers.for_tier("small")
    for result in results:
        response, routed = result.response, result.routed
        # a replay is sampled too: a batch whose publish failed comes back replayed, and its audit would be lost
        # (the audit id is deterministic: the call is paid once, the verdict counted once)
        if result.outcome not in ("paid", "replayed") or response is None or not response.ok or \
                response.content is None:
            continue
        route, request = routed.route, routed.request
        served = AuditAnswer(content=response.content, model=response.model)
        audit: AuditRequest | None = None
        saving = paid_saving(route)
        if saving is not None and route.trimmed_messages and routed.audit_messages is None:
            pass  # the full history was too large to carry: no counterfactual on a context the baseline never had
        elif saving is not None and _sample(settings, routed, saving):
            model, tier = (route.baseline_model, "large") if saving == "routed_down" else (route.model, route.tier)
            audit = _request(routed, saving, candidate=served, job=audit_job(routed, saving, model, tier))
        elif not route.pinned and route.tier != "small" and small and _sample(settings, routed, "routed_up"):
            # the cheapest tier's first model this tenant may use (none: the first, which the wall then skips)
            cheapest = [m for m in small if model_wall(settings, request.tenant, m) is None] or list(small)
            audit = _request(routed, "routed_up", reference=served,
                             job=audit_job(routed, "routed_up", cheapest[0], "small"))
        if audit is not None and skip_reason(settings, audit) is None:
            outs.append(Out(t.AUDITS_DISPATCH, audit, key=request.tenant))
    return outs


def _request(routed: RoutedRequest, kind: DecisionKind, *, job: RoutedRequest,
             candidate: AuditAnswer | None = None, reference: AuditAnswer | None = None) -> AuditRequest:
    request = routed.request
    return AuditRequest(
        audit_id=audit_id(request.tenant, request.id, kind), tenant=request.tenant, request_id=request.id,
        kind=kind, task_type=routed.route.task_type, tier=routed.route.tier, question=routed.keys.lookup_text,
        score=routed.route.escalation_score, candidate=candidate, reference=reference, job=job,
        sampled_at=time.time(),
    )


@dataclass
class AuditCalls:
    settings: Settings
    gateway: Gateway

    def __post_init__(self) -> None:
        """Reads the audit sampling secret now: a secret file that is not mounted fails the start, not a batch."""
        self.settings.audit_sampling_key()

    async def on_dispatch(self, batch: Sequence[Decoded[AuditRequest]], _ctx: BatchContext) -> list[Out]:
        outs: list[Out] = []
        runs = [d for d in batch if d.value.job is not None and skip_reason(self.settings, d.value) is None]
        # One run per audit id: a replayed paid answer is sampled again, so an audit can come twice in a batch.
        runs = list({d.value.audit_id: d for d in runs}.values())
        audits = [d.value for d in runs]
        if not audits:
            return outs
        jobs = [a.job for a in audits if a.job is not None]
        results = await self.gateway.handle(jobs, [d.record.partition for d in runs], can_defer=False)
        by_id = {r.routed.request.id: r for r in results}
        judged: list[tuple[AuditRequest, RoutedRequest]] = []
        for audit in audits:
            result = by_id.get(audit_id(audit.tenant, audit.request_id, audit.kind))
            filled = self._filled(audit, result, outs)
            if filled is None:
                continue
            if self._judge_of(filled) == "llm" and audit.job is not None:
                judged.append((filled, self._judge_job(filled, audit.job)))
            else:
                outs.append(Out(t.AUDITS_ANSWERED, filled, key=filled.tenant))
        if judged:
            verdicts = await self.gateway.handle([job for _, job in judged], [0] * len(judged), can_defer=False)
            for (audit, _), result in zip(judged, verdicts, strict=True):
                outs.extend(self._with_verdict(audit, result))
        return outs

    def _judge_of(self, audit: AuditRequest) -> str:
        return judge_of(self.settings, audit.task_type)

    def _filled(self, audit: AuditRequest, result: Result | None, outs: list[Out]) -> AuditRequest | None:
        response = result.response if result is not None else None
        if result is not None and audit.job is not None:  # billed before the answer is judged usable
            outs.extend(_spent(audit.job, result.usage, "call"))
            outs.extend(_discarded(result))
        if result is None or response is None or not response.ok or response.content is None:
            log.warning("audit_call_failed", audit_id=audit.audit_id, tenant=audit.tenant, kind=audit.kind)
            return None
        answer = AuditAnswer(content=response.content, model=response.model)
        update = {"candidate": answer} if audit.candidate is None else {"reference": answer}
        return audit.model_copy(update={**update, "job": None})

    def _judge_job(self, audit: AuditRequest, base: RoutedRequest) -> RoutedRequest:
        """The judge's call, built from the audited job (its tenant, provider and keys), under its own id."""
        candidate = audit.candidate.content if audit.candidate else ""
        reference = audit.reference.content if audit.reference else ""
        messages = llm_judge_messages(audit.question, candidate, reference,
                                      self.settings.audit_judge_rubric or DEFAULT_RUBRIC)
        request = base.request.model_copy(update={"id": f"{audit.audit_id}-judge", "messages": messages,
                                                  "max_tokens": 8, "tools": (), "response_format": None,
                                                  "tool_choice": None})
        route = base.route.model_copy(update={"model": self.settings.audit_judge_model, "fallbacks": (),
                                              "pinned": True, "reason": "audit judge"})
        return base.model_copy(update={"request": request, "route": route})

    def _with_verdict(self, audit: AuditRequest, result: Result) -> list[Out]:
        response = result.response
        outs = _spent(result.routed, result.usage, "judge") + _discarded(result)  # billed even when unusable
        verdict = parse_llm_verdict(response.content or "") if response is not None and response.ok else None
        if verdict is None:
            log.warning("audit_judge_no_verdict", audit_id=audit.audit_id, tenant=audit.tenant)
        outs.append(Out(t.AUDITS_ANSWERED, audit.model_copy(update={"judge_verdict": verdict}), key=audit.tenant))
        return outs


def _discarded(result: Result) -> list[Out]:
    """The calls an audit paid for whose answers could not be used (malformed), as audit spend."""
    tenant = result.routed.request.tenant
    return [Out(t.USAGE, u.model_copy(update={"stage": "audit"}), key=tenant) for u in result.discarded]


def _spent(job: RoutedRequest, usage: UsageRecord | None, part: str) -> list[Out]:
    """The audit usage of a priced call, from the gateway's own record of it (kept with the paid call, so a
    replay has it too): the chain's last point is what the provider billed, on the model that answered."""
    if usage is None:
        return []
    billed = usage.steps[-1] if usage.steps else usage.baseline
    record = audit_usage(job, usage.actual_model or billed.model, billed.usage, simulated=usage.simulated, part=part)
    return [Out(t.USAGE, record, key=job.request.tenant)]
