"""Packed format, the packer, the simulator following the format, and the backfill file readers/splitter."""

from __future__ import annotations

import json
from pathlib import Path

from frugalstream.llm.providers import SimulatedProvider
from frugalstream.schemas import SamplingParams, SummarizeItem
from frugalstream.summarizer.packing import pack, packed_messages, parse_packed
from frugalstream.tools.backfill import load_items, parse_duration, split_job, write_results
from frugalstream.tools.job_report import JobOutcome


def test_parser_checks_every_item_on_its_own() -> None:
    reply = "### 1\nfirst\n### 2\n\n### 3\nthird\n### 3\nagain\n### 5\nfive\n### 6\ncut"
    parsed = parse_packed(reply, ["1", "2", "3", "4", "5", "6"], max_chars=100, truncated=True)
    assert parsed.good == {"1": "first", "5": "five"}
    assert parsed.bad == {"2": "empty", "3": "repeated", "4": "missing", "6": "truncated"}
    assert parse_packed("### 1\n" + "x" * 50, ["1"], max_chars=10, truncated=False).bad == {"1": "too_long"}


def test_pack_respects_budget_and_item_limit() -> None:
    sizes = [(f"k{i}", 100) for i in range(45)] + [("huge", 5000)]
    packs = pack(sizes, max_tokens=1000, max_items=20)
    assert sorted(len(p) for p in packs) == [1, 5, 10, 10, 10, 10]
    assert ["huge"] in packs and sum(len(p) for p in packs) == 46
    assert all(p == sorted(p, key=lambda k: [s[0] for s in sizes].index(k)) for p in packs)


async def test_simulator_answers_packed_sections_deterministically() -> None:
    sim = SimulatedProvider(latency_scale=0.0)
    a = packed_messages("Summarize.", [("1", "Red kettle"), ("2", "Blue toaster")], 40)
    b = packed_messages("Summarize.", [("1", "Blue toaster"), ("2", "Green mixer")], 40)
    ra = await sim.complete(model="gpt-4o-mini", messages=a, sampling=SamplingParams(temperature=0.0), max_tokens=200)
    rb = await sim.complete(model="gpt-4o-mini", messages=b, sampling=SamplingParams(temperature=0.0), max_tokens=200)
    pa = parse_packed(ra.content, ["1", "2"], max_chars=1000, truncated=False)
    pb = parse_packed(rb.content, ["1", "2"], max_chars=1000, truncated=False)
    assert not pa.bad and not pb.bad
    assert pa.good["2"] == pb.good["1"], "an item's summary does not depend on its pack"
    assert pa.good["1"].startswith("[simulated gpt-4o-mini]")
    assert ra.usage.output_tokens > 0 and ra.simulated


def test_readers_csv_cp1252_jsonl_parquet(tmp_path: Path) -> None:
    csv_path = tmp_path / "items.csv"
    csv_path.write_bytes('id,description\n1,Caf\xe9 grinder\xae\n2,\n3,Kettle\n'.encode("cp1252"))
    items = load_items(csv_path, "description", "id")
    assert [(i.id, i.text) for i in items] == [("1", "Café grinder®"), ("3", "Kettle")]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b"]))
    assert [i.id for i in load_items(jsonl, "text", None)] == ["0", "1"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"sku": "x", "body": "hello"}]), tmp_path / "items.parquet")
    assert load_items(tmp_path / "items.parquet", "body", "sku")[0].text == "hello"


def test_split_puts_distinct_items_first_and_bounds_parts(tmp_path: Path) -> None:
    items = [SummarizeItem(id=f"i{k}", text=f"text {k % 7}") for k in range(50)]
    parts = split_job("j", "t", "Summarize.", items, part_items=10, deadline_s=parse_duration("24h"))
    assert len(parts) == 5 and {p.parts for p in parts} == {5} and {p.total_items for p in parts} == {50}
    assert [i.text for i in parts[0].items[:7]] == [f"text {k}" for k in range(7)]
    assert sum(len(p.items) for p in parts) == 50 and parts[0].deadline_s == 86_400
    out = tmp_path / "out.csv"
    write_results(out, JobOutcome(), ["i0"])
    assert out.read_text().splitlines()[1].startswith("i0,missing")
