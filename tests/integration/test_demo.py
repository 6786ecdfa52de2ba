"""`frugalstream demo` end to end: its own embedded broker, every service, the bundled workload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_answers_every_request_and_its_savings_reconcile(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    # A prefix of the bundled workload keeps CI time down; the full run is in benchmarks/RESULTS.md.
    assert main(["demo", "--limit", "240", "--rate", "60", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["responses"] == report["requests"] == 240
    assert report["errors"] == 0 and report["duplicate_responses"] == 0
    assert 70 <= report["savings_pct"] <= 95
    by_strategy = report["by_strategy"]
    assert by_strategy["routed_down"] > 0 and by_strategy["cache_exact"] > 0
    assert report["baseline_cost_usd"] - report["actual_cost_usd"] == pytest.approx(sum(by_strategy.values()),
                                                                                      abs=1e-9)
