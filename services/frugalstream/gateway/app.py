"""Gateway service: `llm.requests.dispatch` -> `llm.responses` + `llm.usage` (+ `llm.gateway.completed`).

Per batch: the paid-call records of the batch's partitions are consulted, new calls are paid for and recorded
on `llm.gateway.completed` (the store awaits the broker's ack), and only then does the stage publish the
responses and usage and commit (see `frugalstream.gateway.completed`). The consumer's rebalance listener loads the
records of newly assigned partitions before they are fetched, so a replica that takes over a crashed one's
partitions replays what it paid for.

A request the provider rate-limits with a long Retry-After is deferred: its partition is rewound to it and
paused (a `Deferral` the stage applies), so no handler sleeps and other partitions keep flowing. Answers of
later records on that partition are held back: they are recorded already and replay, once, on redelivery.

A request that can wait (`latency_class`, `deadline`) goes into a provider batch job instead
(`frugalstream.gateway.batch_runner`): its dispatch is committed once the job holding it is recorded on
`llm.gateway.batches`, and the runner publishes its answer when the batch (or, near its deadline, an
interactive call) answers it.

The logic (`frugalstream.gateway.logic`) decides each request's `Result`; this module only routes it: the answer
to `llm.responses` keyed by cache scope (and the producer's reply topic), the usage to `llm.usage` keyed by tenant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from faststream.kafka import KafkaBroker

from frugalstream.gateway.audits import AuditCalls, InProcessCompleted, sample_paid
from frugalstream.gateway.batch_jobs import GatewayLoader, TopicBatchJobs
from frugalstream.gateway.batch_runner import BatchRunner
from frugalstream.gateway.batch_wiring import build_batch_runner
from frugalstream.gateway.completed import CompletedLoader, TopicCompleted
from frugalstream.gateway.logic import Gateway, OnResult, Result
from frugalstream.llm.identity import request_key
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.prompt_cache import PromptCachePlanner
from frugalstream.llm.providers import Provider, endpoint_for
from frugalstream.llm.resilience import RetryPolicy
from frugalstream.resources import Resources
from frugalstream.runtime.logging import get_logger
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import MissingKeyFileError, Settings
from frugalstream.runtime.stage import BatchContext, Deferral, Handled, background_options, rewind_points, subscribe
from frugalstream.schemas import TIERS, RoutedRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import AuditRequest

log = get_logger(__name__)
#: The providers that take a key; `simulated` needs none.
KEYED_PROVIDERS = ("openai", "anthropic")
#: Answers remembered as released ahead of a rewound batch; past this the oldest may be published twice.
SENT_AHEAD_MAX = 10_000


@dataclass
class GatewayService:
    settings: Settings
    logic: Gateway
    store: TopicCompleted | None = None  # the topic-backed store behind `logic.completed`, when there is one
    audits: AuditCalls | None = None  # counterfactual calls of audits (`frugalstream.gateway.audits`)
    runner: BatchRunner | None = None  # deferrable requests through provider batch APIs, when enabled
    name: str = "gateway"
    loader: CompletedLoader | None = field(default=None, init=False)
    publisher: Publisher | None = field(default=None, init=False)
    # Keys whose answers were released ahead of a batch that a deferral then rewound (see `_on_dispatch`).
    sent_ahead: dict[str, None] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.store is not None:
            jobs = self.runner.store if self.runner is not None else None
            self.loader = (GatewayLoader(self.settings, self.store, jobs) if isinstance(jobs, TopicBatchJobs)
                           else CompletedLoader(self.settings, self.store))
            if isinstance(self.loader, GatewayLoader) and self.runner is not None:
                self.loader.quiesce = self.runner.quiesce  # a revoke waits for the runner's step in progress

    async def start(self) -> None:
        if self.runner is not None:
            await self.runner.start()

    async def stop_background(self) -> None:
        if self.runner is not None:
            await self.runner.stop()

    async def stop(self) -> None:
        await self.stop_background()
        for provider in self.logic.providers.values():
            await provider.aclose()
        for backend in self.runner.backends.values() if self.runner is not None else ():
            await backend.aclose()

    async def _emit(self, results: Sequence[Result]) -> None:
        """The runner's answers, published as the handler's are (a usage alone: a batch line paid late), and
        sampled for audits as the handler's are: a saving made through a batch job is audited like any other."""
        if self.publisher is None:
            raise RuntimeError("the gateway is not registered")
        await self.publisher.publish_all(self._published(results), service=self.name)

    async def _handle(self, batch: Sequence[Decoded[RoutedRequest]], can_defer: bool,
                      on_result: OnResult | None = None) -> list[Result]:
        """Deferrable requests into batch jobs, the rest called now; one result per distinct request."""
        now = time.time()
        due = {i: self.runner.accepts(d.value, now) for i, d in enumerate(batch)} if self.runner else {}
        later = [(d.value, d.record.partition, when) for i, d in enumerate(batch) if (when := due.get(i)) is not None]
        at_once = [d for i, d in enumerate(batch) if due.get(i) is None]
        results = await self.logic.handle([d.value for d in at_once], [d.record.partition for d in at_once],
                                          can_defer=can_defer, on_result=on_result)
        if later and self.runner is not None:
            results += await self.runner.intake(later)
        return results

    async def _on_dispatch(self, batch: Sequence[Decoded[RoutedRequest]], ctx: BatchContext) -> Handled:
        """Each answer is released as soon as its call is recorded (`BatchContext.release`), so a short answer
        does not wait for a batch-mate's long one; the batch publishes what was not released. An answer released
        before a deferral rewound its partition is remembered (`sent_ahead`), and its replay on redelivery is not
        published again; after a restart or on another member it is, as after any crash: the same answer, its
        usage and audit under the same ids (each counted once downstream)."""
        released: set[str] = set()

        async def release(result: Result) -> None:
            if result.outcome == "replayed" and result.key in self.sent_ahead:
                del self.sent_ahead[result.key]  # published before a deferral rewound it
                released.add(result.key)
            # (a deferral or an unrecorded call has no answer: it comes again, and is handled then)
            elif ctx.release is not None and result.response is not None and \
                    await ctx.release(self._published([result])):
                released.add(result.key)

        results = await self._handle(batch, ctx.can_defer, release)
        waits = {r.key: r.retry_after_s for r in results if r.retry_after_s is not None}
        results = [r for r in results if r.key not in released]
        if not waits:
            return Handled(self._published(results))
        keyed = [(request_key(d.value.request.tenant, d.value.request.id), d.record) for d in batch]
        deferred = [Deferral(record, waits[key]) for key, record in keyed if key in waits]
        rewound = rewind_points(deferred)
        # Records at or after a rewind point come again: their answers not yet released are held back and replay,
        # once, then.
        held = {key for key, record in keyed
                if record.offset >= rewound.get((record.topic, record.partition), (record.offset + 1, 0))[0]}
        for key in released & held:
            self.sent_ahead[key] = None
            if len(self.sent_ahead) > SENT_AHEAD_MAX:
                del self.sent_ahead[next(iter(self.sent_ahead))]  # the oldest: at worst it is published again
        kept = [r for r in results if r.key not in held]
        return Handled(self._published(kept), deferred)

    def _published(self, results: Sequence[Result]) -> list[Out]:
        """What these results publish: each one's answer and usage (`_outs`), and the audit requests of the paid
        answers among them (none when audits are off)."""
        audits = sample_paid(self.settings, results) if self.audits is not None else []
        return [out for r in results for out in _outs(r)] + audits

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        options = {}
        self.publisher = publisher
        if self.runner is not None:
            self.runner.emit = self._emit
            if isinstance(self.runner.store, TopicBatchJobs):
                self.runner.store.publisher = publisher
        if self.store is not None and self.loader is not None:
            self.store.publisher = publisher
            options["listener"] = self.loader
        # The stage hands the listener its batches in flight: a revoke waits for the calls still being paid for
        # to be recorded and committed before the next owner reads the paid-call records.
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.DISPATCH, model=RoutedRequest,
                  process=self._on_dispatch, max_records=32, concurrency=self.settings.gateway_calls_in_flight,
                  concurrency_per_record=True, **options)
        if self.audits is not None:
            # No caller waits on an audit: poll it like the other background consumers.
            subscribe(broker, publisher, self.settings, service=f"{self.name}.audits", topic=t.AUDITS_DISPATCH,
                      model=AuditRequest, process=self.audits.on_dispatch, max_records=32, **background_options())


def _outs(result: Result) -> list[Out]:
    """The answer where its request asked for it, and the usage keyed by tenant (a deferral has neither; a batch
    line paid after its request was answered another way has only the usage), with the usage of every call paid
    for it whose answer could not be used."""
    request = result.routed.request
    usage = [u for u in (result.usage, *result.discarded) if u is not None]
    outs = response_outs(result.response, request, result.routed.keys.scope) if result.response is not None else []
    return outs + [Out(t.USAGE, u, key=request.tenant) for u in usage]


def called_models(s: Settings) -> set[str]:
    """The models the gateway calls whatever requests pin: every tier's, the baselines (the audits'
    counterfactuals) and the LLM judge's when a task type is judged by one."""
    models = {m for tier in TIERS for m in s.tiers.for_tier(tier)} | {s.default_baseline_model}
    models |= {p.baseline_model for p in s.tenants.values() if p.baseline_model is not None}
    if "llm" in s.audit_judges.values():
        models.add(s.audit_judge_model)
    return models


def providers_in_use(s: Settings, catalog: PriceCatalog) -> set[str]:
    """The providers whose keys the services need: the one each called model is sent to (its catalog provider,
    else the routed one) and FRUGAL_PROVIDER itself (the summarizer's)."""
    if s.provider == "simulated":
        return {"simulated"}
    used: set[str] = {s.provider}
    for model in called_models(s):
        listed = catalog.provider(model) if catalog.has(model) else None
        used.add(listed if listed in KEYED_PROVIDERS else endpoint_for(model))
    return used


def build_providers(res: Resources) -> dict[str, Provider]:
    """The providers in use, each refused at start when its key file is missing (`MissingKeyFileError` names the
    setting), and the other keyed ones too, for pins to their models, unless their key file is missing: the
    Secret of a deployment holds only the keys its operator has, and the ConfigMap names every provider's file."""
    s = res.settings
    if s.provider == "simulated":
        return {"simulated": res.provider("simulated")}
    needed = providers_in_use(s, res.catalog)
    providers: dict[str, Provider] = {}
    for name in KEYED_PROVIDERS:
        try:
            providers[name] = res.provider(name)
        except MissingKeyFileError:
            if name in needed:
                raise
            log.info("provider_not_configured", provider=name, reason="no key file; no model in use is there")
    return providers


def wire(res: Resources) -> GatewayService:
    s = res.settings
    providers = build_providers(res)
    policy = RetryPolicy(attempts=s.provider_max_attempts)
    models = called_models(s)
    model_providers = {} if s.provider == "simulated" else {
        m: res.catalog.provider(m) for m in models if res.catalog.has(m)
    }
    completed = TopicCompleted(s)  # paid calls live on `llm.gateway.completed`, not in the state dir
    # The record wraps the answer and its usage: leave a fifth of a message for them.
    gateway = Gateway(providers, completed, policy=policy, model_providers=model_providers,
                      max_answer_bytes=int(s.max_message_bytes * 0.8),
                      prompt_cache=PromptCachePlanner(res.counter, min_tokens=s.prompt_cache_min_tokens,
                                                      ttl_s=s.prompt_cache_ttl_s))
    runner = build_batch_runner(res, gateway, TopicBatchJobs(s)) if s.batch_deferrable else None
    audit_gateway = Gateway(providers, InProcessCompleted(), policy=policy, breakers=gateway.breakers,
                            model_providers=model_providers, max_answer_bytes=int(s.max_message_bytes * 0.4))
    return GatewayService(s, gateway, store=completed, audits=AuditCalls(s, audit_gateway), runner=runner)
