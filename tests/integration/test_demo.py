"""`frugalstream demo` end to end: its own embedded broker, every service, the bundled workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.progress import Progress

import frugalstream.tools.demo
from frugalstream.runtime.settings import Settings
from frugalstream.schemas import LLMResponse
from frugalstream.schemas import topics as t
from frugalstream.tools.cli import main
from tests.integration.adversary import read_quietly

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COALESCE_TIMEOUT_S = 4.0


def test_demo_answers_every_request_and_its_savings_reconcile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request gets one distinct answer, including after the coalescing timeout: the reader keeps listening
    past it after the last first answer, so a follower answered twice (coalesced, then re-dispatched) fails."""
    demo_settings = frugalstream.tools.demo.demo_settings

    def short_coalescing(bootstrap: str, state_dir: Path, latency_scale: float) -> Settings:
        # The demo's 30 s timeout would make the quiet period 30 s; the workload's leaders answer well within 4 s.
        return demo_settings(bootstrap, state_dir, latency_scale).model_copy(
            update={"coalesce_timeout_s": COALESCE_TIMEOUT_S})

    async def collect_quietly(bootstrap: str, settings: Settings, ids: set[str], timeout_s: float,
                              progress: Progress | None = None) -> dict[str, list[LLMResponse]]:
        assert bootstrap == settings.kafka_bootstrap
        return await read_quietly(settings, settings.topic(t.RESPONSES), want=ids, key_of=lambda r: r.request_id,
                                  timeout_s=timeout_s, quiet_s=COALESCE_TIMEOUT_S + 3)

    monkeypatch.setattr(frugalstream.tools.demo, "demo_settings", short_coalescing)
    monkeypatch.setattr(frugalstream.tools.demo, "collect_responses", collect_quietly)
    out = tmp_path / "demo.json"
    # A prefix of the bundled workload keeps CI time down; the full run is in benchmarks/RESULTS.md.
    assert main(["demo", "--limit", "240", "--rate", "60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["responses"] == report["requests"] == 240
    # `duplicate_responses` counts distinct answers beyond the first (identical redelivered copies count once).
    assert report["errors"] == 0 and report["duplicate_responses"] == 0
    assert report["by_source"].get("coalesced", 0) + report["by_source"].get("cache_exact", 0) > 0
    assert 70 <= report["savings_pct"] <= 95
    by_strategy = report["by_strategy"]
    assert by_strategy["routed_down"] > 0 and by_strategy["cache_exact"] > 0
    assert report["baseline_cost_usd"] - report["actual_cost_usd"] == pytest.approx(sum(by_strategy.values()),
                                                                                      abs=1e-9)
