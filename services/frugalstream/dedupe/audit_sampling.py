"""Which of dedupe's savings are audited, and the free labels of near misses.

A sampled semantic hit or coalesced answer becomes an `AuditRequest` whose job is the baseline model on the
request as routed (the gateway runs it; its answer only ever reaches `llm.audits.answered`). Every cache audit
names the lookup path that decided (`rule`) with that path's score and threshold, so a verdict on an
answer-cluster hit labels the cluster threshold and never the verifier's. A semantic miss with a near miss (the
verifier's best rejected candidate, a cluster vote short of its threshold) is remembered (bounded) until its
fresh answer comes back: comparing the two is a label that costs no model call.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.dedupe.results import Audit, identity
from frugalstream.llm.audits import audit_id, audit_job, audit_rate, sampled
from frugalstream.llm.identity import request_key
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import CacheEntry, LLMResponse, RoutedRequest
from frugalstream.schemas.audits import AuditAnswer, AuditRequest, DecisionKind


@dataclass
class AuditSampler:
    settings: Settings
    max_pending: int = 50_000
    _near: OrderedDict[tuple[str, str], tuple[RoutedRequest, SemanticHit]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        """Reads the audit sampling secret now: a secret file that is not mounted fails the start, not a batch."""
        self.settings.audit_sampling_key()

    def _sampled(self, routed: RoutedRequest, kind: DecisionKind) -> bool:
        """By the salted hash every sampling service shares (`llm.audits.sampled`). Never a request whose spend a
        budget refuses: an audit buys the baseline's answer, and a near miss's label waits for a fresh answer such a
        request does not get."""
        if routed.route.refused_by_budget is not None:
            return False
        request = routed.request
        rate = audit_rate(self.settings.audit_rates, kind, self.settings.audit_rate)
        return sampled(request.tenant, request.id, kind, rate, self.settings.audit_sampling_key())

    def _request(self, routed: RoutedRequest, kind: DecisionKind, hit: SemanticHit | None,
                 candidate: AuditAnswer, reference: AuditAnswer | None) -> AuditRequest:
        request = routed.request
        job = None if reference is not None else audit_job(routed, kind, routed.route.baseline_model)
        # Two near misses of one request (one per path) are two audits: the cluster's id names its path.
        part = "answer_cluster" if kind == "near_miss" and hit is not None and hit.rule == "answer_cluster" else None
        return AuditRequest(
            audit_id=audit_id(request.tenant, request.id, kind, part), tenant=request.tenant, request_id=request.id,
            kind=kind, task_type=routed.route.task_type, tier=routed.route.tier, question=routed.keys.lookup_text,
            score=hit.score if hit else None, threshold=hit.threshold if hit else None,
            rule=hit.rule if hit else None, candidate=candidate, reference=reference, job=job,
            sampled_at=time.time(),
        )

    def on_hit(self, routed: RoutedRequest, hit: SemanticHit) -> Audit | None:
        if not self._sampled(routed, "cache_semantic"):
            return None
        answer = AuditAnswer(content=hit.entry.content, model=hit.entry.model)
        return Audit(self._request(routed, "cache_semantic", hit, answer, None))

    def on_follower(self, routed: RoutedRequest, leader: LLMResponse) -> Audit | None:
        if leader.content is None or not self._sampled(routed, "coalesced"):
            return None
        return Audit(self._request(routed, "coalesced", None, AuditAnswer(content=leader.content,
                                                                          model=leader.model), None))

    def on_near_miss(self, routed: RoutedRequest, near: SemanticHit) -> None:
        if not self._sampled(routed, "near_miss"):
            return
        self._near[(identity(routed), near.rule)] = (routed, near)
        while len(self._near) > self.max_pending:
            self._near.popitem(last=False)

    def on_answer(self, response: LLMResponse) -> list[Audit]:
        """The fresh answer of a near miss: a free label per path (candidate = what the cache would have served)."""
        key = request_key(response.tenant, response.request_id)
        found = [p for rule in ("verifier", "answer_cluster") if (p := self._near.pop((key, rule), None)) is not None]
        if response.source != "llm" or response.content is None:
            return []
        fresh = AuditAnswer(content=response.content, model=response.model)
        audits: list[Audit] = []
        for routed, near in found:
            entry: CacheEntry = near.entry
            audits.append(Audit(self._request(routed, "near_miss", near,
                                              AuditAnswer(content=entry.content, model=entry.model), fresh)))
        return audits
