"""Contracts of the audit loop: `llm.audits.dispatch`, `llm.audits.answered`, `llm.audits`,
`llm.audits.reviews` and the compacted `llm.thresholds`.

An audit pairs the answer a saving served with the counterfactual (the baseline model on the full context, no
cache). Audit answers travel only on these topics, keyed by tenant: never on `llm.responses`, never to a reply
topic, so no caller (and no other tenant) ever receives one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from frugalstream.schemas._base import Contract
from frugalstream.schemas.requests import RoutedRequest, TaskType, Tier

#: The kinds of decision an audit judges. The savings: `cache_semantic`, `coalesced`, `routed_down`. Free labels:
#: `near_miss` (a semantic candidate the verifier rejected, compared with the fresh answer paid for anyway).
#: The playbook's question: `routed_up` (a request sent above the cheapest tier, also asked of the cheapest:
#: could it have gone cheaper?).
DecisionKind = Literal["cache_semantic", "coalesced", "routed_down", "near_miss", "routed_up", "trimmed"]
DECISION_KINDS: tuple[DecisionKind, ...] = ("cache_semantic", "coalesced", "routed_down", "near_miss", "routed_up",
                                             "trimmed")
Verdict = Literal["accept", "reject"]
#: Which path of the semantic lookup made a cache decision: the verifier on the nearest cached questions, or the
#: answer clusters (cached questions that share an answer). Each has its own threshold and labels only its own.
SemanticRule = Literal["verifier", "answer_cluster"]
JudgeName = Literal["match", "embedding", "llm", "human"]


class AuditAnswer(BaseModel):
    """One answer of an audit pair (text only: an audit judges what a person would read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: str
    model: str | None = None


class AuditRequest(Contract):
    """A sampled decision: `candidate` is the cheaper answer under judgement, `reference` the counterfactual it
    is judged against. On `llm.audits.dispatch` one of them is missing and `job` is the call the gateway runs to
    fill it (request id = the audit id, so its answer is never the caller's); on `llm.audits.answered` both are
    set (and `judge_verdict` holds the LLM judge's verdict when the task type's judge is an LLM)."""

    schema_version: Literal[1] = 1
    audit_id: str = Field(description="Deterministic from (tenant, request id, kind): a redelivery is one audit.")
    tenant: str
    request_id: str
    kind: DecisionKind
    task_type: TaskType | None = None
    tier: Tier | None = None
    question: str = Field(default="", description="The request's last user turn, for judges and reviewers.")
    # Finite only (score and threshold): the stage dead-letters a NaN or an infinity instead of judging it.
    score: float | None = Field(
        default=None, allow_inf_nan=False,
        description="The decision's own score: the verifier's for cache decisions, the escalation "
                    "score for routing. Thresholds are moved on it.")
    threshold: float | None = Field(default=None, allow_inf_nan=False,
                                    description="The threshold in force when the decision was made.")
    rule: SemanticRule | None = Field(
        default=None, description="For a cache decision, the lookup path whose score and threshold these are.")
    candidate: AuditAnswer | None = None
    reference: AuditAnswer | None = None
    job: RoutedRequest | None = None
    judge_verdict: Verdict | None = None
    candidate_grade: Verdict | None = Field(
        default=None, description="The judge's grade of the candidate alone (accept = right), when it gave one.")
    reference_grade: Verdict | None = Field(
        default=None, description="The judge's grade of the reference alone: a quality-retained target counts "
                                  "the baseline's own misses from it (unset: the reference is taken as right).")
    sampled_at: float


class AuditEstimate(BaseModel):
    """Acceptance of one (tenant, task type, decision kind) cell with its 95% Wilson interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    task_type: str
    kind: DecisionKind
    n: int = Field(ge=0)
    accepted: int = Field(ge=0)
    rate: float
    low: float
    high: float


class AuditRecord(Contract):
    """A judged audit on `llm.audits` (key = tenant), with the estimate of its cell after counting it.

    It carries all the audit service needs to count it again: a restarted service rebuilds its estimates, its
    threshold labels and what reviewers may judge from this topic."""

    schema_version: Literal[1] = 1
    audit_id: str
    tenant: str
    request_id: str
    kind: DecisionKind
    task_type: str
    tier: Tier | None = None
    question: str = ""
    candidate: AuditAnswer
    reference: AuditAnswer
    judge: JudgeName
    verdict: Verdict
    similarity: float | None = Field(default=None, description="Answer-embedding cosine, when that judge ran.")
    score: float | None = Field(default=None, allow_inf_nan=False)  # finite: a restart counts it again
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    rule: SemanticRule | None = None
    candidate_grade: Verdict | None = Field(default=None, description="The judge's grade of the candidate alone.")
    reference_grade: Verdict | None = Field(default=None, description="The judge's grade of the reference alone.")
    estimate: AuditEstimate
    judged_at: float


class ReviewVerdict(Contract):
    """A person's verdict on `llm.audits.reviews` (key = tenant). `answers_sha256` ties it to the exact pair
    the reviewer saw: a verdict for another pair (or another tenant's audit) is refused by the audit service."""

    schema_version: Literal[1] = 1
    audit_id: str
    tenant: str
    verdict: Verdict
    answers_sha256: str = Field(min_length=64, max_length=64)
    reviewer: str = Field(default="", max_length=128)
    reviewed_at: float


Knob = Literal["semantic_verify", "answer_cluster", "route_mid"]
#: The range each knob may take: a semantic threshold at or below its floor would serve any neighbour as a hit.
KNOB_BOUNDS: dict[Knob, tuple[float, float]] = {"semantic_verify": (0.3, 1.0), "answer_cluster": (0.5, 1.0),
                                                "route_mid": (0.0, 1.0)}


class ThresholdChange(Contract):
    """The latest threshold of one (tenant, task type, knob) on the compacted `llm.thresholds` topic
    (key = `tenant/task_type/knob`), with the evidence that moved it. Numbers are finite and `value` lies in its
    knob's `KNOB_BOUNDS`: the services apply it as is."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Literal[1] = 1
    tenant: str
    task_type: TaskType
    knob: Knob
    value: float
    previous: float
    reason: Literal["bound_broken", "evidence"]
    target: float
    n: int = Field(ge=0, description="Labelled decisions the change rests on.")
    estimate: float
    low: float
    high: float
    changed_at: float = Field(ge=0)

    @model_validator(mode="after")
    def _in_bounds(self) -> ThresholdChange:
        lo, hi = KNOB_BOUNDS[self.knob]
        if not lo <= self.value <= hi:
            raise ValueError(f"{self.knob} must lie in [{lo}, {hi}], got {self.value}")
        return self
