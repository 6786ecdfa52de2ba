"""Budgets act: a tenant over its budget is downgraded or refused within one budget update of crossing it, on its
requests and its backfills alike. A refusing budget refuses spend: a repeat the cache answers is still served."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from frugalstream.classifier.app import ClassifierService
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, LLMRequest, SummarizeItem
from frugalstream.summarizer.app import SummarizerService
from frugalstream.tools.backfill import run_backfill, split_job
from frugalstream.tools.demo import collect_responses, produce
from tests.integration.conftest import PipelineFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def pinned(i: int, tenant: str) -> LLMRequest:
    return LLMRequest(id=f"{tenant}-{i}", tenant=tenant, model="gpt-4o",
                      messages=(ChatMessage(role="user", content=f"Write a long essay about topic {i}."),))


async def wait_for_status(service: ClassifierService | SummarizerService, tenant: str, status: str,
                          timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        verdict = service.logic.budgets.verdict(tenant, {})
        if verdict is not None and verdict.status == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{service.name} never saw {tenant} {status}")


async def test_over_budget_tenant_is_downgraded_and_refusing_tenant_gets_a_clear_error(
    pipeline: PipelineFactory, integration_settings: Settings, tmp_path: Path,
) -> None:
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"budgets": [
        {"tenant": "thrifty", "period": "day", "limit_usd": 0.0001, "action": "downgrade"},
        {"tenant": "strict", "period": "month", "limit_usd": 0.0001, "action": "refuse"},
    ]}))
    settings = integration_settings.model_copy(update={"budgets_file": budgets})
    async with pipeline(settings=settings) as running:
        classifier = running.service("classifier")
        assert isinstance(classifier, ClassifierService)
        # One pinned large-model call each crosses both limits.
        first = [pinned(0, "thrifty"), pinned(0, "strict")]
        await produce(settings.kafka_bootstrap, settings, first, None)
        got = await collect_responses(settings.kafka_bootstrap, settings, {r.id for r in first}, 60)
        assert {r[0].model for r in got.values()} == {"gpt-4o"}
        await wait_for_status(classifier, "thrifty", "over", 30)
        await wait_for_status(classifier, "strict", "over", 30)
        repeat = pinned(0, "strict").model_copy(update={"id": "strict-again"})  # what it paid for once
        second = [pinned(1, "thrifty"), pinned(1, "strict"), pinned(0, "unbudgeted"), repeat]
        await produce(settings.kafka_bootstrap, settings, second, None)
        got = await collect_responses(settings.kafka_bootstrap, settings, {r.id for r in second}, 60)
        summarizer = running.service("summarizer")
        assert isinstance(summarizer, SummarizerService)
        await wait_for_status(summarizer, "thrifty", "over", 30)
        await wait_for_status(summarizer, "strict", "over", 30)
        items = [SummarizeItem(id=f"i{n}", text=f"Oak table number {n}") for n in range(3)]
        backfills = {tenant: await run_backfill(settings, split_job(f"b-{tenant}", tenant, "Summarize.", items,
                                                                    model="gpt-4o"), timeout_s=60)
                     for tenant in ("thrifty", "strict")}
    assert {r.model for r in backfills["thrifty"].results.values()} == {"gpt-4o-mini"}  # downgraded, not refused
    assert {r.status for r in backfills["thrifty"].results.values()} == {"ok"}
    assert {(r.error or "").split(":")[0] for r in backfills["strict"].results.values()} == {"budget_exceeded"}
    downgraded, refused, free = got["thrifty-1"][0], got["strict-1"][0], got["unbudgeted-0"][0]
    assert downgraded.source == "llm" and downgraded.tier == "small" and downgraded.model == "gpt-4o-mini"
    assert refused.source == "error" and refused.error is not None
    assert refused.error.code == "budget_exceeded" and "strict" in refused.error.message
    assert free.model == "gpt-4o", "other tenants keep their pinned model"
    again = got["strict-again"][0]
    assert again.source == "cache_exact" and again.model == "gpt-4o", "an answer that costs nothing is not refused"
