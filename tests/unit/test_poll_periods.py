"""Which consumers poll at the answer path's fetch wait, and which at the background period.

On a broker that answers a waiting fetch only when it times out (the embedded one), every consumer at the short
wait costs CPU while idle, so only the three stages a caller waits on may use it; a consumer left on it by
mistake burns a share of a core, one moved off it adds half a second to every answer.
"""

from __future__ import annotations

from pathlib import Path

from frugalstream.bootstrap import Resources
from frugalstream.llm.embedder import HashingEmbedder
from frugalstream.llm.providers import SimulatedProvider
from frugalstream.runner import RunningServices
from frugalstream.runtime.settings import Settings
from frugalstream.runtime.stage import BACKGROUND_WAIT_MS

ANSWER_PATH = {"frugalstream.classifier", "frugalstream.dedupe", "frugalstream.gateway"}


def test_only_the_stages_a_caller_waits_on_poll_at_the_short_wait(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, simulated_latency_scale=0.0, kafka_idempotent=False,
                        kafka_fetch_max_wait_ms=7)
    resources = Resources(settings, embedder_factory=HashingEmbedder,
                          provider_factory=lambda _name: SimulatedProvider(latency_scale=0.0))
    running = RunningServices(["classifier", "dedupe", "gateway", "summarizer", "accountant", "audit"], resources)
    try:
        for svc in running.services:
            svc.register(running.broker, running.publisher)  # registering reads nothing: no broker needed
        # FastStream keeps a subscriber's aiokafka consumer options here until it starts.
        waits = {(sub.group_id, ",".join(sorted(t.name for t in sub.topics))): sub._connection_args["fetch_max_wait_ms"]
                 for sub in running.broker.subscribers}
    finally:
        resources.close()
    short = {group for (group, _topics), wait in waits.items() if wait == 7}
    assert short == ANSWER_PATH
    background = {key: wait for key, wait in waits.items() if key[0] not in ANSWER_PATH}
    assert len(background) >= 8  # budgets, thresholds, usage, audits, reviews, jobs, ...
    assert set(background.values()) == {BACKGROUND_WAIT_MS}, background
