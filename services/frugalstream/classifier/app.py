"""Classifier service: `llm.requests` -> `llm.requests.routed` (or an error response); follows `llm.budgets`.

The logic decides (`Routed`, `Refused`, the answer to an invalid request); this module says where each goes:
a routed request keyed by its cache scope, so one scope's requests meet in one dedupe partition; a refusal on
`llm.responses` and, when its reply topic was granted, a copy there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from faststream.kafka import KafkaBroker

from frugalstream.classifier.invalid import invalid_request_answer
from frugalstream.classifier.logic import Classified, Classifier, Routed
from frugalstream.classifier.router import EscalationRouter
from frugalstream.classifier.routing import TierThresholds, reason_kind
from frugalstream.resources import Resources
from frugalstream.runtime.messaging import Publisher
from frugalstream.runtime.metrics import METRICS, Metrics
from frugalstream.runtime.records import Decoded, Out, Record
from frugalstream.runtime.replies import response_outs
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BatchContext, follow_state, subscribe
from frugalstream.schemas import BudgetState, LLMRequest
from frugalstream.schemas import topics as t
from frugalstream.schemas.audits import ThresholdChange


def result_outs(results: Sequence[Classified]) -> list[Out]:
    """Where each result goes; a refused reply topic gets nothing, not even the refusal."""
    outs: list[Out] = []
    for result in results:
        if isinstance(result, Routed):
            outs.append(Out(t.ROUTED, result.routed, key=result.routed.keys.scope))
        elif result.reply_allowed:
            outs.extend(response_outs(result.response, result.request, None))
        else:
            outs.append(Out(t.RESPONSES, result.response, key=result.request.id))
    return outs


@dataclass
class ClassifierService:
    settings: Settings
    logic: Classifier
    name: str = "classifier"
    metrics: Metrics = METRICS

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def _on_requests(self, batch: Sequence[Decoded[LLMRequest]], _ctx: BatchContext) -> list[Out]:
        results = await self.logic.handle([d.value for d in batch])
        for result in results:
            if isinstance(result, Routed):
                route = result.routed.route
                self.metrics.record_routing(route, result.routed.request.tenant, reason_kind(route))
        return result_outs(results)

    def _on_invalid(self, record: Record, exc: Exception) -> list[Out]:
        """An undecodable request that names its id and tenant gets a terminal error (it is dead-lettered too),
        on `llm.responses` only: its reply topic is unvalidated input."""
        answer = invalid_request_answer(record.value, exc, self.settings)
        return [] if answer is None else [Out(t.RESPONSES, answer, key=answer.request_id)]

    def register(self, broker: KafkaBroker, publisher: Publisher) -> None:
        subscribe(broker, publisher, self.settings, service=self.name, topic=t.REQUESTS, model=LLMRequest,
                  process=self._on_requests, on_invalid=self._on_invalid,
                  concurrency=self.settings.concurrent_batches)
        # Every instance needs every budget, so the compacted topic is read whole, without a consumer group.
        follow_state(broker, publisher, self.settings, service=f"{self.name}.budgets", topic=t.BUDGETS,
                     model=BudgetState, update=self.logic.budgets.update)
        follow_state(broker, publisher, self.settings, service=f"{self.name}.thresholds", topic=t.THRESHOLDS,
                     model=ThresholdChange, update=self.logic.live.update)


def wire(res: Resources) -> ClassifierService:
    s = res.settings
    thresholds = TierThresholds(mid=s.route_threshold_mid, large=s.route_threshold_large)
    return ClassifierService(s, Classifier(s, res.counter, embedder=res.embedder, scorer=EscalationRouter.load(),
                                           thresholds=thresholds, catalog=res.catalog))
