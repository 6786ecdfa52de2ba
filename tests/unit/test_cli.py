"""The command line: report reads the ledger in every format; bad invocations fail with a clear message."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.schemas import CostPoint, PricedStep, TokenUsage, UsageRecord
from frugalstream.tools.cli import main


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "ledger.sqlite"
    usage = TokenUsage(input_tokens=2000, output_tokens=300)
    catalog = PriceCatalog.load()
    with Ledger(path) as ledger:
        for i, tenant in enumerate(["acme", "acme", "globex"]):
            ledger.add(cost_event(UsageRecord(
                id=f"gateway:r{i}", request_id=f"r{i}", tenant=tenant, stage="gateway", source="llm",
                baseline=CostPoint(model="gpt-4o", usage=usage),
                steps=(PricedStep(strategy="routed_down", model="gpt-4o-mini", usage=usage),), occurred_at=1.7e9 + i,
            ), catalog))
    return path


def test_report_formats(ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", str(ledger_path), "--by", "tenant", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["tenant"] for r in rows} >= {"acme", "globex"}
    assert main(["report", "--db", str(ledger_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["requests"] == 3
    html = tmp_path / "r.html"
    assert main(["report", "--db", str(ledger_path), "--format", "html", "--out", str(html)]) == 0
    text = html.read_text()
    assert "<svg" in text and "<script src" not in text and "<link" not in text, "one self-contained file"


def test_report_without_a_ledger_says_so(tmp_path: Path) -> None:
    assert main(["report", "--db", str(tmp_path / "missing.sqlite")]) == 2


def test_calibrate_needs_exactly_one_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--requests", str(tmp_path / "x.jsonl")]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_dev_listens_on_9092_by_default_and_takes_a_port() -> None:
    from frugalstream.tools.cli import build_parser, cmd_dev

    args = build_parser().parse_args(["dev"])
    assert args.port == 9092 and args.func is cmd_dev
    assert build_parser().parse_args(["dev", "--port", "19092"]).port == 19092


def test_dev_settings_point_at_the_embedded_broker_and_keep_a_configured_state_dir(tmp_path: Path) -> None:
    from frugalstream.runtime.settings import Settings
    from frugalstream.tools.devmode import DEV_STATE_DIR, dev_settings

    settings = dev_settings(19092, Settings())
    assert settings.kafka_bootstrap == "127.0.0.1:19092" and not settings.kafka_idempotent
    assert settings.state_dir == DEV_STATE_DIR and settings.provider == "simulated"
    configured = dev_settings(19092, Settings(state_dir=tmp_path, provider="openai"))
    assert configured.state_dir == tmp_path and configured.provider == "openai", "a configured provider is kept"
