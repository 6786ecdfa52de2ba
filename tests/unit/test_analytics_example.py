"""The analytics example flattens real cost events and deduplicates redeliveries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.schemas import CostPoint, PricedStep, TokenUsage, UsageRecord

EXAMPLE = Path(__file__).parents[2] / "deploy" / "analytics" / "cost_events.py"


def test_flatten_dedupes_and_keeps_totals() -> None:
    spec = importlib.util.spec_from_file_location("cost_events_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    usage = TokenUsage(input_tokens=1000, output_tokens=200)
    record = UsageRecord(
        id="gateway:r1", request_id="r1", tenant="acme", stage="gateway", source="llm", tags={"team": "ads"},
        baseline=CostPoint(model="gpt-4o", usage=usage),
        steps=(PricedStep(strategy="routed_down", model="gpt-4o-mini", usage=usage),), occurred_at=1.7e9,
    )
    event = json.loads(cost_event(record, PriceCatalog.load()).model_dump_json())
    rows = list(module.flatten([event, event]))
    assert len(rows) == 1
    row = rows[0]
    assert row["tag_team"] == "ads" and row["saved_cache_exact"] == 0.0
    assert abs(row["baseline_cost_usd"] - row["actual_cost_usd"] - row["saved_routed_down"]) < 1e-9
