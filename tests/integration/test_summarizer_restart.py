"""A summarizer stopped in the middle of a 2,000-item backfill finishes it after a restart, with every item
answered and no distinct item paid twice, on the embedded broker.

The first summarizer crashes while its handler is inside the job: its consume task is cancelled wherever it
is waiting (model calls in flight, or a publish), so the job's offset is not committed. A graceful stop
would not do: it lets the handler finish the part. The second summarizer, sharing the state directory and
consumer group, gets the job again. A counting provider records every item of every *completed* model call (a call
cancelled before it returned was never billed) across both runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.llm.providers import Completion, SimulatedProvider
from frugalstream.llm.providers.simulated import packed_items
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import ChatMessage, SamplingParams, SummarizeItem
from frugalstream.schemas import topics as t
from frugalstream.summarizer.plan import content_hash
from frugalstream.tools.backfill import publish_parts, split_job
from frugalstream.tools.embedded_broker import EmbeddedBroker
from frugalstream.tools.job_report import JobFollower

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ITEMS = 2_000
DISTINCT = 800
INSTRUCTION = "Summarize this product in one sentence."


class CountingProvider:
    """Counts, per content hash, the items of every call that returned (was paid)."""

    name = "simulated"

    def __init__(self, paid: Counter[str]) -> None:
        self.inner = SimulatedProvider(latency_scale=0.05)
        self.paid = paid
        self.calls = 0

    async def complete(self, *, model: str, messages: Sequence[ChatMessage], sampling: SamplingParams,
                       max_tokens: int | None = None, tools: Sequence[Mapping[str, Any]] = (),
                       response_format: Mapping[str, Any] | None = None) -> Completion:
        result = await self.inner.complete(model=model, messages=messages, sampling=sampling, max_tokens=max_tokens)
        packed = packed_items(messages)
        texts = [text for _, text in packed[1]] if packed else [messages[-1].content.split("\n\n", 1)[1]]
        self.calls += 1
        self.paid.update(content_hash(text) for text in texts)
        return result

    async def aclose(self) -> None:
        return None


def catalog() -> list[SummarizeItem]:
    texts = [f"Acme widget model W{i:04d}, {i % 7 + 1} speed settings, {i % 5 + 2} year warranty, colour {i % 11}"
             for i in range(DISTINCT)]
    return [SummarizeItem(id=f"item-{n}", text=texts[(n * 7919) % DISTINCT]) for n in range(ITEMS)]


async def crash(running: RunningServices) -> None:
    """Cancel the consume tasks mid-handler, as a killed process would stop, before the graceful stop runs."""
    tasks = [task for sub in running.broker.subscribers for task in getattr(sub, "tasks", [])]
    assert tasks, "no consume task to cancel"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for(check: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_restart_mid_backfill_pays_each_item_once(embedded_broker: EmbeddedBroker, topic_prefix: str,
                                                        tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap=embedded_broker.bootstrap, kafka_idempotent=False,
                        kafka_fetch_max_wait_ms=50, topic_prefix=f"{topic_prefix}.", group_prefix=topic_prefix,
                        state_dir=tmp_path / "state", provider="simulated", log_level="WARNING")
    await embedded_broker.create_topics({settings.topic(n): 4 for n in t.ALL_TOPICS})
    items = catalog()
    parts = split_job("restart-job", "acme", INSTRUCTION, items)
    paid: Counter[str] = Counter()
    follower = JobFollower(settings, "restart-job", "acme")
    await follower.start()
    try:
        first = CountingProvider(paid)
        resources = Resources(settings, embedder_factory=HashingEmbedder, provider_factory=lambda _n: first)
        async with RunningServices(["summarizer"], resources) as running:
            await publish_parts(settings, parts)
            await wait_for(lambda: first.calls >= 12, 60, "the first summarizer to be mid-job")
            await crash(running)
        assert 12 <= first.calls < DISTINCT // 20, "the first run must stop in the middle of the job"
        await follower.poll(500)
        assert not follower.outcome.finished

        second = CountingProvider(paid)
        resources = Resources(settings, embedder_factory=HashingEmbedder, provider_factory=lambda _n: second)
        async with RunningServices(["summarizer"], resources):
            outcome = await follower.follow(ITEMS, 120)
    finally:
        await follower.stop()

    assert second.calls > 0
    assert set(outcome.results) == {i.id for i in items}, "every item gets an answer"
    assert all(r.status == "ok" for r in outcome.results.values())
    assert outcome.conflicts == 0, "a re-emitted answer is the same answer"
    assert set(paid) == {content_hash(i.text) for i in items}
    assert max(paid.values()) == 1, f"paid twice: {[h for h, n in paid.items() if n > 1][:5]}"
    assert first.calls + second.calls == DISTINCT // 20  # full packs, none repeated
    # Accounting: each original item sits in exactly one distinct usage record, whatever was re-published.
    assert sum(r.items for r in outcome.usage.values()) == ITEMS
    assert outcome.progress is not None and outcome.progress.finished
    assert outcome.progress.done_items == ITEMS and outcome.progress.model_calls == DISTINCT // 20
