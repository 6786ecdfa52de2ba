"""Prometheus metrics on a dedicated registry.

A dedicated CollectorRegistry (not prometheus_client's global one) keeps the exposition to our own series,
lets several services share a process (`frugalstream demo`) without duplicate-registration errors, and lets
tests build a fresh `Metrics` each time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from frugalstream.schemas import BudgetState, CostData, Route, TokenUsage
from frugalstream.schemas.audits import AuditEstimate, ThresholdChange

NO_MODEL = "none"
OTHER = "other"  # the label value of the models and tenants past the caps
MODEL_LABELS = 100  # distinct model names labelled, the first seen; the rest are `other`
OTHER_TENANT_LABELS = 100  # unconfigured tenants labelled by name (the `metrics_tenant_labels` setting's default)


@dataclass
class StageStats:
    """Cumulative handler time of one service, split into our own work and waiting for broker acks: benches
    report the time spent inside the services apart from the broker's."""

    batches: int = 0
    records: int = 0
    process_s: float = 0.0
    publish_s: float = 0.0

    def add(self, records: int, process_s: float, publish_s: float) -> None:
        self.batches += 1
        self.records += records
        self.process_s += process_s
        self.publish_s += publish_s

    def reset(self) -> None:
        self.batches = self.records = 0
        self.process_s = self.publish_s = 0.0
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The series every service reports; label values are bounded (tenants, models, enums). A tenant or model
    name is a free field of a request or usage record, so each is capped: configured tenants (`bound_tenants`)
    plus the first `other_tenants` others seen, and the first `MODEL_LABELS` models seen; past the caps, `other`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._models: set[str] = set()
        self._configured_tenants: frozenset[str] = frozenset()
        self._other_tenants: set[str] = set()
        self.other_tenants = OTHER_TENANT_LABELS
        r = self.registry
        self.spend_usd = Counter("frugal_spend_usd", "Actual LLM spend (USD).", ["tenant", "model"], registry=r)
        self.baseline_usd = Counter(
            "frugal_baseline_usd", "What the same work would have cost without frugalstream (USD).",
            ["tenant", "model"], registry=r)
        self.saved_usd = Counter(
            "frugal_saved_usd", "Savings attributed to a strategy (USD); negative savings go to "
            "frugal_strategy_extra_cost_usd, since counters only increase.", ["tenant", "strategy"], registry=r)
        self.extra_cost_usd = Counter(
            "frugal_strategy_extra_cost_usd", "Cost a strategy added (e.g. a cache write) (USD).",
            ["tenant", "strategy"], registry=r)
        self.responses = Counter("frugal_responses", "Terminal responses by source.", ["source"], registry=r)
        self.routing = Counter(
            "frugal_routing_decisions", "Classifier routing decisions by tier.", ["tier", "task_type"], registry=r)
        self.stage_latency = Histogram(
            "frugal_stage_latency_seconds", "Time spent inside a service stage per message.", ["stage"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.best_effort_failures = Counter(
            "frugal_best_effort_publish_failures", "Reply-topic copies and dead letters whose publish failed or "
            "timed out; the batch went on (see the reply_publish_failed / dead_letter_publish_failed logs).",
            ["kind"], registry=r)
        self.oversize_outputs = Counter(
            "frugal_oversize_outputs", "Outputs over max_message_bytes, replaced before publishing by a too_large "
            "error response or a capped dead letter.", ["kind"], registry=r)
        self.publish_backoffs = Counter(
            "frugal_publish_backoffs", "Batches whose primary outputs failed to publish: partitions paused, then "
            "the batch is redelivered.", ["service"], registry=r)
        self.unpriced_usage = Counter(
            "frugal_unpriced_usage", "Usage records billed for a model the price catalog lacks (priced at the "
            "catalog's highest rates and flagged price_unknown).", ["model"], registry=r)
        self.stages: dict[str, StageStats] = {}  # per service, in-process only (benches read it)
        self.budget_publish_failures = Counter(
            "frugal_budget_publish_failures", "Budget state publishes that failed (the states stay pending and "
            "are published by the next evaluation).", registry=r)
        self.dedupe_decisions = Counter(
            "frugal_dedupe_decisions", "Dedupe decisions by outcome: exact or semantic cache hits, requests "
            "coalesced behind an in-flight twin, misses dispatched to the gateway, and misses refused (a budget "
            "refuses their spend).", ["outcome"], registry=r)
        self.gateway_outcomes = Counter(
            "frugal_gateway_outcomes", "Dispatched requests by what the gateway did: paid (a provider call), "
            "replayed (a recorded call), failed (an error answer), deferred (rate limited), unrecorded (the record "
            "was not acknowledged, delivered again), duplicate (another copy in the same batch).", ["outcome"],
            registry=r)
        self.batch_events = Counter(
            "frugal_gateway_batch_events", "Deferred requests through provider batch jobs, by event.", ["event"],
            registry=r)
        self.tokens = Counter(
            "frugal_tokens", "Billed tokens by kind (input excludes cached reads and cache writes; output excludes "
            "reasoning), counted once per priced usage record.", ["tenant", "model", "kind"], registry=r)
        self.errors = Counter(
            "frugal_errors", "Terminal error responses by code (invalid_request, budget_exceeded, provider_error, "
            "timeout, too_large...) and the service that answered.", ["service", "code"], registry=r)
        self.consumer_lag = Gauge(
            "frugal_consumer_lag", "Records behind the partition's end, as of this member's last batch from it "
            "(high watermark minus the next offset).", ["group", "topic", "partition"], registry=r)
        self._lag_seen: dict[str, set[tuple[str, int]]] = {}
        self.budget_remaining = Gauge(
            "frugal_budget_remaining_usd", "Budget left in the current period (limit minus spend, floored at 0), "
            "as the accountant last published it.", ["tenant", "budget"], registry=r)
        self.budget_limit = Gauge(
            "frugal_budget_limit_usd", "The budget's limit for its period.", ["tenant", "budget"], registry=r)
        self.audit_acceptance = Gauge(
            "frugal_audit_acceptance", "Audited acceptance of a kind of decision per tenant and task type: the "
            "rate and its 95% Wilson interval (bound = rate, low, high).", ["tenant", "task_type", "kind", "bound"],
            registry=r)
        self.audit_samples = Gauge(
            "frugal_audit_samples", "Judged audits behind `frugal_audit_acceptance`.", ["tenant", "task_type", "kind"],
            registry=r)
        self.live_threshold = Gauge(
            "frugal_threshold", "Threshold the audits set per tenant and task type (knob = semantic_verify, "
            "answer_cluster, route_mid).", ["tenant", "task_type", "knob"], registry=r)
        # Decision counters: why the classifier and dedupe did what they did (audit counters go beside these).
        self.routing_reasons = Counter(
            "frugal_routing_reasons", "Routed requests by tier and what set it: floor (the task type's floor), score "
            "(the escalation score raised it), long_input, pinned (the caller's model), budget (a budget lowered "
            "it), policy (the tenant's max tier or allowed models lowered it).", ["tier", "reason"], registry=r)
        self.budget_downgrades = Counter(
            "frugal_budget_downgrades", "Requests a near or over budget sent to a cheaper tier (a dropped pin "
            "included), by tenant and the tier they got.", ["tenant", "tier"], registry=r)
        self.context_trims = Counter(
            "frugal_context_trims", "Requests whose history was trimmed to the task type's context budget.",
            ["task_type"], registry=r)
        self.trimmed_tokens = Counter(
            "frugal_trimmed_tokens", "Input tokens the trims removed (untrimmed minus sent).", ["task_type"],
            registry=r)
        self.verifier_decisions = Counter(
            "frugal_verifier_decisions", "Semantic verifier decisions per candidate: accept, reject (scored under "
            "the threshold) or veto (a rule refused it), with the reason (model, exact or the rule's name).",
            ["outcome", "reason"], registry=r)

    def bound_tenants(self, configured: Iterable[str], others: int) -> None:
        """Configured tenants are always labelled by name; of the others, the first `others` seen."""
        self._configured_tenants = frozenset(configured)
        self.other_tenants = others

    def tenant(self, name: str) -> str:
        """The label value of a tenant: its name while within the cap, else `other`."""
        if name in self._configured_tenants or name in self._other_tenants:
            return name
        if len(self._other_tenants) < self.other_tenants:
            self._other_tenants.add(name)
            return name
        return OTHER

    def model(self, name: str) -> str:
        """The label value of a model: its name for the first `MODEL_LABELS` names seen, else `other`."""
        if name not in self._models and len(self._models) < MODEL_LABELS:
            self._models.add(name)
        return name if name in self._models else OTHER

    def record_cost(self, data: CostData) -> None:
        """Counts one priced event; baseline and spend are labelled by the models that (would have) run."""
        tenant, model = self.tenant(data.tenant), self.model(data.model or NO_MODEL)
        self.spend_usd.labels(tenant, model).inc(max(0.0, data.actual_cost_usd))
        self.baseline_usd.labels(tenant, self.model(data.baseline_model)).inc(max(0.0, data.baseline_cost_usd))
        for strategy, saved in data.savings_by_strategy.items():
            if saved >= 0:
                self.saved_usd.labels(tenant, strategy).inc(saved)
            else:
                self.extra_cost_usd.labels(tenant, strategy).inc(-saved)
        if data.usage is not None:
            self.record_tokens(tenant, model, data.usage)

    def record_tokens(self, tenant: str, model: str, usage: TokenUsage) -> None:
        tenant, model = self.tenant(tenant), self.model(model)
        for kind, n in (("input", usage.input_tokens), ("cached", usage.cached_input_tokens),
                        ("cache_write", usage.cache_write_tokens), ("output", usage.output_tokens),
                        ("reasoning", usage.reasoning_tokens)):
            if n > 0:
                self.tokens.labels(tenant, model, kind).inc(n)

    def record_error(self, service: str, code: str) -> None:
        self.errors.labels(service, code).inc()

    def record_budget(self, state: BudgetState) -> None:
        """Gauges: past the tenant cap, `other` holds the last state published of any tenant there."""
        tenant = self.tenant(state.tenant)
        self.budget_remaining.labels(tenant, state.budget_id).set(max(0.0, state.limit_usd - state.spent_usd))
        self.budget_limit.labels(tenant, state.budget_id).set(state.limit_usd)

    def record_audit(self, estimate: AuditEstimate) -> None:
        """A cell's audited acceptance (gauges: past the tenant cap, `other` holds the last cell set there)."""
        labels = (self.tenant(estimate.tenant), estimate.task_type, estimate.kind)
        for bound, value in (("rate", estimate.rate), ("low", estimate.low), ("high", estimate.high)):
            self.audit_acceptance.labels(*labels, bound).set(value)
        self.audit_samples.labels(*labels).set(estimate.n)

    def record_threshold(self, change: ThresholdChange) -> None:
        self.live_threshold.labels(self.tenant(change.tenant), change.task_type, change.knob).set(change.value)

    def record_lag(self, group: str, lags: dict[tuple[str, int], int], assigned: set[tuple[str, int]]) -> None:
        """Sets the lag of the partitions just read and drops the series of partitions no longer assigned."""
        seen = self._lag_seen.setdefault(group, set())
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(group, topic, str(partition)).set(max(0, lag))
            seen.add((topic, partition))
        for topic, partition in seen - assigned:
            self.consumer_lag.remove(group, topic, str(partition))
            seen.discard((topic, partition))

    def record_unpriced(self, models: tuple[str, ...] | list[str]) -> None:
        """Label values come from billed usage: capped like every model label (`model`)."""
        for model in models:
            self.unpriced_usage.labels(self.model(model)).inc()

    def record_response(self, source: str) -> None:
        self.responses.labels(source).inc()

    def record_route(self, tier: str, task_type: str) -> None:
        self.routing.labels(tier, task_type).inc()

    def record_dedupe(self, outcome: str) -> None:
        self.dedupe_decisions.labels(outcome).inc()

    def record_routing(self, route: Route, tenant: str, reason: str) -> None:
        """One routed request: what set its tier, whether a budget lowered it, whether its history was trimmed."""
        self.routing_reasons.labels(route.tier, reason).inc()
        if route.downgraded_by_budget:
            self.budget_downgrades.labels(self.tenant(tenant), route.tier).inc()
        if route.trimmed_messages:
            self.context_trims.labels(route.task_type).inc()
            self.trimmed_tokens.labels(route.task_type).inc(max(0, route.full_input_tokens - route.input_tokens))

    def record_verdict(self, hit: bool, reason: str) -> None:
        """A verifier decision: a miss the model scored is a reject, any other miss a rule's veto."""
        outcome = "accept" if hit else "reject" if reason == "model" else "veto"
        self.verifier_decisions.labels(outcome, reason).inc()

    def record_best_effort_failure(self, kind: str) -> None:
        self.best_effort_failures.labels(kind).inc()

    def record_oversize(self, kind: str) -> None:
        self.oversize_outputs.labels(kind).inc()

    def record_publish_backoff(self, service: str) -> None:
        self.publish_backoffs.labels(service).inc()

    def record_batch(self, event: str, n: int = 1) -> None:
        """Deferred requests through provider batch jobs: joined, submitted, answered, fallback, late_line, done."""
        self.batch_events.labels(event=event).inc(n)

    def record_gateway(self, outcome: str, n: int = 1) -> None:
        self.gateway_outcomes.labels(outcome).inc(n)

    def observe_stage(self, service: str, records: int, process_s: float, publish_s: float) -> None:
        self.stages.setdefault(service, StageStats()).add(records, process_s, publish_s)

    def observe_latency(self, stage: str, seconds: float) -> None:
        self.stage_latency.labels(stage).observe(seconds)


METRICS = Metrics()


def exposition(metrics: Metrics = METRICS) -> str:
    """The Prometheus text format of `metrics` (what `/metrics` serves, see `runtime.probes`), e.g. for a test."""
    return generate_latest(metrics.registry).decode()
