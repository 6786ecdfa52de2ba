"""The audit service's work: judge answered audits, keep the estimates, move the thresholds.

Per audit: the judge its task type names (an LLM judge's verdict arrives with the audit; no verdict, no
record), one verdict per audit id (a redelivery counts nothing again; a person's verdict replaces the machine's),
the cell's estimate after counting it, and a label for the threshold controller:
- `cache_semantic` and `near_miss` label the tenant's threshold of the lookup path that made them (`rule`):
  `semantic_verify` (score = the verifier's score) or `answer_cluster` (score = the cluster model's confidence);
- `routed_down` to the cheapest tier and `routed_up` label its routing threshold (score = escalation score).
Labels are weighted by 1/sampling rate, so a 5% audit of hits and every free near miss weigh what they stand for.

A review verdict is accepted only for an audit this service judged, of the same tenant, on the same pair of
answers (`answers_sha256`): a verdict cannot be replayed onto another audit or across a tenant wall.

Tenants never interfere: the audits remembered for dedupe and review are bounded per tenant (a configured
tenant's are never evicted by another's volume; the tenants not configured, free names a producer may invent,
share one tenant's worth, the largest evicted from first, as do their estimates and threshold labels), and an
audit already counted in its estimate cell is never judged again, so a redelivery forgotten by that memory still
cannot replace a person's verdict with a machine's. Nor do they grow `llm.thresholds`, which every classifier and
dedupe holds whole: at most `unconfigured_max` tenants not configured get thresholds of their own (`may_hold`).

An audit or review is counted when its batch is processed, before the stage publishes the record; when that
publish is not acknowledged the batch comes again and finds it counted. `llm.audits` is all a restart reads and
`llm.thresholds` all the classifier and dedupe read, so a redelivery publishes again what its first delivery
made (`judged_before`, `reviewed_before`): the remembered record and the threshold change its batch caused,
while that change is still in force (one superseded since is never published again: it would move the
threshold back).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from frugalstream.audit.cells import CellBook, Shares
from frugalstream.audit.controller import Label, ThresholdController
from frugalstream.llm import pair_encoder
from frugalstream.llm import verifier as lexical
from frugalstream.llm.audit_stats import Proportion
from frugalstream.llm.audits import answers_digest, audit_rate
from frugalstream.llm.judges import Judge, Judgement
from frugalstream.llm.onnx_models import shipped_answer_cluster_threshold
from frugalstream.llm.thresholds import ThresholdBook
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.settings import Settings, TenantPolicy
from frugalstream.schemas import TASK_TYPES, TaskType
from frugalstream.schemas.audits import (
    DECISION_KINDS,
    AuditEstimate,
    AuditRecord,
    AuditRequest,
    DecisionKind,
    JudgeName,
    Knob,
    ReviewVerdict,
    ThresholdChange,
)

log = get_logger(__name__)
Cell = tuple[str, str, DecisionKind]
KnobCell = tuple[str, str, Knob]
Outputs = tuple[list[AuditRecord], list[ThresholdChange]]


@dataclass
class EstimateBook:
    """Latest verdict per audit id, per (tenant, task type, kind): the estimate is over distinct audits.
    A verdict is (accepted, by a person). Each cell keeps `window` verdicts; the tenants not `reserve`d share one
    tenant's worth (`window` per task type and kind), evicted as `Shares` says."""

    window: int = 100_000
    book: CellBook[Cell, tuple[bool, bool]] = field(init=False)

    def __post_init__(self) -> None:
        self.book = CellBook(self.window, (len(TASK_TYPES) + 1) * len(DECISION_KINDS))

    def reserve(self, tenants: Iterable[str]) -> None:
        """The configured tenants: their verdicts are never evicted by other tenants' (call before any `put`)."""
        self.book.reserve(tenants)

    def put(self, cell: Cell, audit_id: str, accepted: bool, human: bool = False) -> None:
        self.book.put(cell, audit_id, (accepted, human))

    def verdict(self, cell: Cell, audit_id: str) -> tuple[bool, bool] | None:
        """The counted (accepted, by a person) of this audit, None when it is not counted in the cell."""
        return self.book.get(cell).get(audit_id)

    def by_a_person(self, cell: Cell, audit_id: str) -> bool:
        verdict = self.verdict(cell, audit_id)
        return verdict is not None and verdict[1]

    def estimate(self, cell: Cell) -> AuditEstimate:
        verdicts = self.book.get(cell)
        accepted = sum(a for a, _ in verdicts.values())
        p = Proportion.of(accepted, len(verdicts))
        return AuditEstimate(tenant=cell[0], task_type=cell[1], kind=cell[2], n=len(verdicts), accepted=accepted,
                             rate=round(p.rate, 6), low=round(p.low, 6), high=round(p.high, 6))


class Recent(Mapping[str, AuditRecord]):
    """The latest judged record per audit id (what a redelivery is checked against and what reviewers may
    judge), at most `per_tenant` of each tenant, least recent evicted first. A `reserved` (configured) tenant's
    audits are never evicted by another tenant's volume. The other tenants, free names a producer may invent,
    share `shared` records (default `per_tenant`): past it, the oldest audit of the tenant holding the most goes
    (`Shares`), so a flood evicts its own audits before a quiet tenant's audits awaiting review (a reviewed one,
    put again, is its tenant's most recent)."""

    def __init__(self, per_tenant: int, reserved: Iterable[str] = (), shared: int | None = None) -> None:
        self.per_tenant = per_tenant
        self.shares = Shares(per_tenant if shared is None else shared, reserved)
        self._records: dict[str, AuditRecord] = {}
        self._order: dict[str, OrderedDict[str, None]] = {}  # per tenant: its audit ids, least recent first

    def put(self, record: AuditRecord) -> None:
        old = self._records.get(record.audit_id)
        if old is not None and old.tenant != record.tenant:
            self._remove(old.tenant, record.audit_id)
            old = None
        self._records[record.audit_id] = record
        ids = self._order.setdefault(record.tenant, OrderedDict())
        ids[record.audit_id] = None
        ids.move_to_end(record.audit_id)
        self.shares.moved(record.tenant, 0 if old is not None else 1)
        while len(ids) > self.per_tenant:
            self._remove(record.tenant, next(iter(ids)))
        while self.shares.over():
            tenant = self.shares.victim()
            self._remove(tenant, next(iter(self._order[tenant])))

    def _remove(self, tenant: str, audit_id: str) -> None:
        ids = self._order[tenant]
        del ids[audit_id]
        self._records.pop(audit_id, None)
        self.shares.moved(tenant, -1)
        if not ids:
            del self._order[tenant]

    def __getitem__(self, audit_id: str) -> AuditRecord:
        return self._records[audit_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


def knob_of(audit: AuditRecord | AuditRequest) -> Knob | None:
    if audit.kind in ("cache_semantic", "near_miss"):
        return "answer_cluster" if audit.rule == "answer_cluster" else "semantic_verify"
    if audit.kind == "routed_up" or (audit.kind == "routed_down" and audit.tier == "small"):
        return "route_mid"
    return None


@dataclass
class Auditor:
    settings: Settings
    judges: Mapping[str, Judge]  # by judge name: match, embedding
    controller: ThresholdController = field(default_factory=ThresholdController)
    book: ThresholdBook = field(default_factory=ThresholdBook)
    estimates: EstimateBook = field(default_factory=EstimateBook)
    clock: Callable[[], float] = time.time
    recent_max: int = 100_000  # audits remembered per configured tenant, and for all the others together
    unconfigured_max: int = 1_000  # tenants not configured that may hold thresholds of their own (`may_hold`)
    recent: Recent = field(init=False)
    # Per threshold cell: the last change this service decided and the audits of the batch that caused it.
    caused: dict[KnobCell, tuple[ThresholdChange, frozenset[str]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.controller.min_evidence = self.settings.audit_min_evidence
        self.recent = Recent(self.recent_max, reserved=self.settings.tenants)
        self.controller.reserve(self.settings.tenants)
        self.estimates.reserve(self.settings.tenants)

    def judge_name(self, task_type: str | None) -> str:
        judges = self.settings.audit_judges
        return judges.get(task_type or "", judges.get("default", "embedding"))

    async def judge(self, batch: Sequence[AuditRequest]) -> tuple[list[AuditRecord], list[ThresholdChange]]:
        """Judged records and the threshold changes they caused, in batch order."""
        fresh = [a for a in batch if a.candidate is not None and a.reference is not None and not self._seen(a)]
        judgements: dict[str, tuple[JudgeName, Judgement]] = {}
        by_judge: dict[str, list[AuditRequest]] = {}
        for audit in fresh:
            if audit.judge_verdict is not None:
                judgements[audit.audit_id] = ("llm", Judgement(audit.judge_verdict))
            elif self.judge_name(audit.task_type) != "llm":
                by_judge.setdefault(self.judge_name(audit.task_type), []).append(audit)
            else:
                log.warning("audit_without_verdict", audit_id=audit.audit_id, tenant=audit.tenant)
        for name, audits in by_judge.items():
            found = await self.judges[name].judge(
                [(a.question, a.candidate.content if a.candidate else "", a.reference.content if a.reference else "")
                 for a in audits])
            for audit, judgement in zip(audits, found, strict=True):
                judgements[audit.audit_id] = ("match" if name == "match" else "embedding", judgement)
        records: list[AuditRecord] = []
        for audit in fresh:
            if audit.audit_id not in judgements or self._seen(audit):
                continue
            name, judgement = judgements[audit.audit_id]
            records.append(self._record(audit, name, judgement))
        return records, self._decide(records)

    def judged_before(self, batch: Sequence[AuditRequest], judged: Sequence[AuditRecord]) -> Outputs:
        """What a redelivered batch publishes again (`judged`: what `judge` made of it): the records of its audits
        judged before it, and the threshold changes they caused still in force. Nothing is counted again."""
        new = {r.audit_id for r in judged}
        return self._again(a.audit_id for a in batch if a.audit_id not in new and
                           (known := self.recent.get(a.audit_id)) is not None and known.tenant == a.tenant)

    def reviewed_before(self, verdicts: Sequence[ReviewVerdict], counted: Sequence[AuditRecord]) -> Outputs:
        """`judged_before` for reviews (`counted`: what `review` made of them): a person's verdict its audit
        already carries is published again."""
        new = {r.audit_id for r in counted}
        return self._again(v.audit_id for v in verdicts if v.audit_id not in new and
                           (known := self._reviewable(v)) is not None and (known.judge, known.verdict) == (
                               "human", v.verdict))

    def _again(self, audit_ids: Iterable[str]) -> Outputs:
        records = [self.recent[i] for i in dict.fromkeys(audit_ids)]
        changes: list[ThresholdChange] = []
        for r in records:
            knob = knob_of(r)
            caused = None if knob is None else self.caused.get((r.tenant, r.task_type, knob))
            if caused is None or r.audit_id not in caused[1] or caused[0] in changes:
                continue
            change = caused[0]
            if self.book.get(change.tenant, change.task_type, change.knob) == change.value:  # still in force
                changes.append(change)
        return records, changes

    def _seen(self, audit: AuditRequest) -> bool:
        """Judged already: remembered, or counted in its estimate cell (remembered or not)."""
        return audit.audit_id in self.recent or \
            self.estimates.verdict((audit.tenant, audit.task_type or "", audit.kind), audit.audit_id) is not None

    def _record(self, audit: AuditRequest, judge: JudgeName, judgement: Judgement) -> AuditRecord:
        assert audit.candidate is not None and audit.reference is not None
        record = AuditRecord(
            audit_id=audit.audit_id, tenant=audit.tenant, request_id=audit.request_id, kind=audit.kind,
            task_type=audit.task_type or "", tier=audit.tier, question=audit.question, candidate=audit.candidate,
            reference=audit.reference, judge=judge, verdict=judgement.verdict, similarity=judgement.similarity,
            score=audit.score, threshold=audit.threshold, rule=audit.rule, candidate_grade=audit.candidate_grade,
            reference_grade=audit.reference_grade,
            estimate=self.estimates.estimate((audit.tenant, audit.task_type or "", audit.kind)),  # before counting
            judged_at=self.clock(),
        )
        return self._count(record)

    def _count(self, record: AuditRecord) -> AuditRecord:
        """Counts a verdict (replacing any earlier one of the same audit) in the estimate of its cell and the
        labels of its threshold; returns the record with the cell's estimate after counting it."""
        cell: Cell = (record.tenant, record.task_type, record.kind)
        accepted = record.verdict == "accept"
        self.estimates.put(cell, record.audit_id, accepted, record.judge == "human")
        record = record.model_copy(update={"estimate": self.estimates.estimate(cell)})
        knob = knob_of(record)
        self.recent.put(record)
        if knob is not None and record.score is not None:
            weight = 1.0 / max(audit_rate(self.settings.audit_rates, record.kind, self.settings.audit_rate), 1e-6)
            grades = None if record.judge == "human" or record.candidate_grade is None or \
                record.reference_grade is None else (record.candidate_grade == "accept",
                                                     record.reference_grade == "accept")
            self.controller.observe(record.tenant, record.task_type, knob,
                                    Label(record.score, accepted, weight, grades), key=record.audit_id)
        return record

    def restore(self, records: Sequence[AuditRecord]) -> int:
        """Counts judged audits read back from `llm.audits` (a restart): estimates, threshold labels and what
        reviewers may judge come back; thresholds are not decided again (`llm.thresholds` holds them). A record
        already counted with the same verdict changes nothing; returns how many were counted."""
        counted = 0
        for record in records:
            known = self.recent.get(record.audit_id)
            if known is not None and (known.judge, known.verdict) == (record.judge, record.verdict):
                continue
            if known is not None and known.judge == "human" and record.judge != "human":
                continue  # a person's verdict is never replaced by a machine's
            if record.judge != "human" and \
                    self.estimates.by_a_person((record.tenant, record.task_type, record.kind), record.audit_id):
                continue  # nor once forgotten by the bounded memory: its estimate cell knows a person judged it
            self._count(record)
            counted += 1
        return counted

    def review(self, verdicts: Sequence[ReviewVerdict]) -> tuple[list[AuditRecord], list[ThresholdChange]]:
        """People's verdicts replace the machine's, for audits of the same tenant on the same answers only."""
        records: list[AuditRecord] = []
        for v in verdicts:
            known = self._reviewable(v)
            if known is None:
                log.warning("review_refused", audit_id=v.audit_id, tenant=v.tenant)
                continue
            if known.judge == "human" and known.verdict == v.verdict:
                continue
            records.append(self._count(known.model_copy(update={"judge": "human", "verdict": v.verdict,
                                                                "judged_at": self.clock()})))
        return records, self._decide(records)

    def _reviewable(self, v: ReviewVerdict) -> AuditRecord | None:
        """The audit `v` may judge: one this service judged, of the same tenant, on the same answers."""
        known = self.recent.get(v.audit_id)
        if known is None or known.tenant != v.tenant or \
                answers_digest(known.candidate, known.reference) != v.answers_sha256:
            return None
        return known

    def _decide(self, records: Sequence[AuditRecord]) -> list[ThresholdChange]:
        if not self.settings.audit_calibrate:
            return []
        changes: list[ThresholdChange] = []
        cells = {(r.tenant, r.task_type, knob) for r in records if (knob := knob_of(r)) is not None and r.task_type}
        for tenant, task_type, knob in sorted(cells):
            if not self.may_hold(tenant):
                log.warning("threshold_not_held", tenant=tenant, task_type=task_type, knob=knob,
                            unconfigured_max=self.unconfigured_max)
                continue
            current = self.current(tenant, task_type, knob)
            kept = self.quality_target(tenant) if knob == "route_mid" else None
            if kept is not None:
                change = self.controller.decide_quality(tenant, _task(task_type), current, kept,
                                                        self.settings.audit_min_sample)
            else:
                change = self.controller.decide(tenant, _task(task_type), knob, current, self.target(tenant, knob))
            if change is not None:
                change = self.book.stamped(change)  # past the change it replaces, whatever this clock says
                self.book.update(change)
                changes.append(change)
                self.caused[(tenant, task_type, knob)] = (change, frozenset(
                    r.audit_id for r in records if (r.tenant, r.task_type, knob_of(r)) == (tenant, task_type, knob)))
        return changes

    def may_hold(self, tenant: str) -> bool:
        """May `tenant`'s thresholds move? Every reader holds `llm.thresholds` whole, so the tenants not configured
        (free names a producer may invent, one rejected audit each) hold thresholds of their own up to
        `unconfigured_max` of them, counted from the topic; past it a new one keeps the configured thresholds."""
        if tenant in self.settings.tenants or tenant in self.book.tenants:
            return True
        return len(self.book.tenants - self.settings.tenants.keys()) < self.unconfigured_max

    def current(self, tenant: str, task_type: str, knob: Knob) -> float:
        live = self.book.get(tenant, task_type, knob)
        if live is not None:
            return live
        s = self.settings
        if knob == "route_mid":
            return s.route_threshold_mid
        if knob == "answer_cluster":
            return s.answer_cluster_threshold if s.answer_cluster_threshold is not None \
                else shipped_answer_cluster_threshold()
        shipped = pair_encoder.shipped_thresholds(s.model_precision)[1] if s.semantic_verifier == "cross_encoder" \
            else lexical.DEFAULT_VERIFY_THRESHOLD
        return float(s.semantic_verify_threshold.get(task_type, shipped))

    def target(self, tenant: str, knob: Knob) -> float:
        """Minimum acceptance among the decisions taken: 1 - false-hit bound for the cache."""
        policy = self.settings.tenants.get(tenant, TenantPolicy())
        if knob in ("semantic_verify", "answer_cluster"):
            return 1.0 - (policy.false_hit_target or self.settings.audit_false_hit_target)
        return policy.acceptance_target or self.settings.audit_acceptance_target

    def quality_target(self, tenant: str) -> float | None:
        """Quality retained the tenant's routing must hold; None: the routed-down acceptance target applies."""
        policy = self.settings.tenants.get(tenant, TenantPolicy())
        return policy.quality_target or self.settings.audit_quality_target


def _task(task_type: str) -> TaskType:
    return task_type if task_type in TASK_TYPES else "chat"
