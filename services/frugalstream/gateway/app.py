"""Gateway service: `llm.requests.dispatch` -> `llm.responses` + `llm.usage` (+ `llm.gateway.completed`).

Per batch: the paid-call records of the batch's partitions are consulted, new calls are paid for and recorded
on `llm.gateway.completed` (the store awaits the broker's ack), and only then does the stage publish the
responses and usage and commit (see `frugalstream.gateway.completed`). The consumer's rebalance listener loads the
records of newly assigned partitions before they are fetched, so a replica that takes over a crashed one's
partitions replays what it paid for.

A request the provider rate-limits with a long Retry-After is deferred: its partition is rewound to it and
paused (a `Deferral` the stage applies), so no handler sleeps and other partitions keep flowing. Answers of
later records on that partition are held back: they are recorded already and replay, once, on redelivery.

The logic (`frugalstream.gateway.logic`) decides each request's `Result`; this module only routes it: the answer
to `llm.responses` keyed by cache scope (and the producer's reply topic), the usage to `llm.usage` keyed by tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from faststream.kafka import KafkaBroker

from frugalstream.gateway.completed import CompletedLoader, TopicCompleted
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.identity import request_key
from frugalstream.llm.resilience import RetryPolicy
from frugalstream.resources import Resources
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.records import Decoded, Out
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, Deferral, Handled, rewind_points, subscribe
from frugalstream.schemas import TIERS, RoutedRequest
from frugalstream.schemas import topics as t


@dataclass
class GatewayService:
    settings: Settings
    logic: Gateway
    store: TopicCompleted | None = None  # the topic-backed store behind `logic.completed`, when there is one
    name: str = "gateway"
    loader: CompletedLoader | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.store is not None:
            self.loader = CompletedLoader(self.settings, self.store)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        for provider in self.logic.providers.values():
            await provider.aclose()

    async def _on_dispatch(self, batch: Sequence[Decoded[RoutedRequest]], ctx: BatchContext) -> Handled:
        results = await self.logic.handle([d.value for d in batch], [d.record.partition for d in batch],
                                          can_defer=ctx.can_defer)
        waits = {r.key: r.retry_after_s for r in results if r.retry_after_s is not None}
        if not waits:
            return Handled([out for r in results for out in _outs(r)])
        keyed = [(request_key(d.value.request.tenant, d.value.request.id), d.record) for d in batch]
        deferred = [Deferral(record, waits[key]) for key, record in keyed if key in waits]
        rewound = rewind_points(deferred)
        # Records at or after a rewind point come again: their answers are held back and replay, once, then.
        held = {key for key, record in keyed
                if record.offset >= rewound.get((record.topic, record.partition), (record.offset + 1, 0))[0]}
        return Handled([out for r in results if r.key not in held for out in _outs(r)], deferred)

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        options = {}
        if self.store is not None and self.loader is not None:
            self.store.publisher = publisher
            options["listener"] = self.loader
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.DISPATCH, model=RoutedRequest,
                  process=self._on_dispatch, max_records=128, **options)


def _outs(result: Result) -> list[Out]:
    """The answer where its request asked for it, and the usage keyed by tenant (a deferral has neither)."""
    if result.response is None:
        return []
    request = result.routed.request
    outs = response_outs(result.response, request, result.routed.keys.scope)
    if result.usage is not None:
        outs.append(Out(t.USAGE, result.usage, key=request.tenant))
    return outs


def wire(res: Resources) -> GatewayService:
    s = res.settings
    names = ("simulated",) if s.provider == "simulated" else ("openai", "anthropic")
    providers = {n: res.provider(n) for n in names}
    policy = RetryPolicy(attempts=s.provider_max_attempts)
    models = {m for tier in TIERS for m in s.tiers.for_tier(tier)}
    model_providers = {} if s.provider == "simulated" else {
        m: res.catalog.provider(m) for m in models if res.catalog.has(m)
    }
    completed = TopicCompleted(s)  # paid calls live on `llm.gateway.completed`, not in the state dir
    # The record wraps the answer and its usage: leave a fifth of a message for them.
    gateway = Gateway(providers, completed, policy=policy, model_providers=model_providers,
                      max_answer_bytes=int(s.max_message_bytes * 0.8))
    return GatewayService(s, gateway, store=completed)
