"""Read `llm.cost-events` into a DuckDB table or a pandas DataFrame.

    pip install duckdb pandas   # not needed by frugalstream itself
    python deploy/analytics/cost_events.py --bootstrap localhost:9092 --out costs.jsonl
    duckdb -c "SELECT tenant, sum(baseline_cost_usd) baseline, sum(actual_cost_usd) actual,
               sum(saved_usd) saved FROM read_json_auto('costs.jsonl') GROUP BY tenant"

or in pandas: `pandas.read_json("costs.jsonl", lines=True)`.

Events are at-least-once: deduplicate on the CloudEvents `id` (this script does; so does the SQL below if you
append to a table: `SELECT DISTINCT ON (id) *`). One flat row per event, one `saved_<strategy>` column per
strategy, so a pivot-free GROUP BY gives the savings report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable, Iterator
from typing import Any

STRATEGIES = ("cache_exact", "cache_semantic", "coalesced", "routed_down", "context_trim",
              "batch_dedupe", "batch_packing", "batch_api")


def flatten(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """CloudEvents envelopes -> analyst rows, first occurrence of each id only."""
    seen: set[str] = set()
    for event in events:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        data = event["data"]
        row = {
            "id": event["id"], "time": event["time"], "tenant": data["tenant"], "stage": data["stage"],
            "task_type": data.get("task_type"), "source": data["source"], "model": data.get("model"),
            "baseline_model": data["baseline_model"], "baseline_cost_usd": data["baseline_cost_usd"],
            "actual_cost_usd": data["actual_cost_usd"], "saved_usd": data["saved_usd"],
            "estimated": data["estimated"], "catalog_version": data["catalog_version"],
            **{f"tag_{k}": v for k, v in data.get("tags", {}).items()},
        }
        savings = data.get("savings_by_strategy", {})
        row.update({f"saved_{s}": savings.get(s, 0.0) for s in STRATEGIES})
        yield row


async def read_topic(bootstrap: str, topic: str, idle_s: float = 3.0) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    events: list[dict[str, Any]] = []
    try:
        while batch := await consumer.getmany(timeout_ms=int(idle_s * 1000)):
            events.extend(json.loads(r.value) for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default="localhost:9092")
    parser.add_argument("--topic", default="llm.cost-events")
    parser.add_argument("--out", default="costs.jsonl")
    args = parser.parse_args()
    rows = list(flatten(asyncio.run(read_topic(args.bootstrap, args.topic))))
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(rows)} cost events to {args.out}")


if __name__ == "__main__":
    main()
