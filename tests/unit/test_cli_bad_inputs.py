"""Bad files and arguments of the commands that read or write files (backfill, report, prices update, bench
embed): one line on stderr naming what is wrong, exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.tools import backfill
from tests.unit.test_cli_errors import _clean_config, fails  # noqa: F401 - the fixture is autouse here too


@pytest.fixture
def items(tmp_path: Path) -> Path:
    path = tmp_path / "items.csv"
    path.write_text("id,text\n1,hello\n")
    return path


@pytest.fixture
def kafka_never_asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every question to the broker: the checks under test must fail before any."""
    asked: list[str] = []
    monkeypatch.setattr(backfill, "check_bootstrap", lambda *a, **k: asked.append(k.get("command", "?")))
    return asked


def backfill_argv(path: Path, *extra: str) -> list[str]:
    return ["backfill", str(path), "--text-col", "text", "--instruction", "S.", *extra]


@pytest.mark.parametrize("encoding", ["utf-9", "base64"])
@pytest.mark.parametrize("command", ["backfill", "bench summarize"])
def test_an_encoding_python_cannot_decode_text_with_is_refused_with_the_flag(
        items: Path, command: str, encoding: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = backfill_argv(items) if command == "backfill" else [
        "bench", "summarize", "--items", str(items), "--text-col", "text"]
    line = fails([*argv, "--encoding", encoding], capsys)
    assert "--encoding" in line and repr(encoding) in line and "utf-8" in line


def test_a_parquet_file_that_is_not_parquet_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyarrow", reason="reading Parquet needs the parquet extra")
    path = tmp_path / "items.parquet"
    path.write_bytes(b"id,text\n1,hello\n")  # a CSV saved with the wrong extension
    line = fails(backfill_argv(path), capsys)
    assert str(path) in line and "not a readable Parquet file" in line


def test_an_infinite_deadline_says_what_a_duration_is(items: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(backfill_argv(items, "--deadline", "1e400h"), capsys)
    assert "--deadline" in line and "'1e400h'" in line and "24h" in line


@pytest.mark.parametrize("extra", [["--deadline", "0s"], ["--max-output-tokens", "0"],
                                   ["--max-output-tokens", "100000"], ["--tenant", ""], ["--instruction", ""],
                                   ["--job-id", "j" * 200]], ids=lambda a: " ".join(a)[:30])
def test_a_job_field_the_contract_refuses_names_its_flag_before_kafka_is_asked(
        items: Path, extra: list[str], kafka_never_asked: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    flag = extra[0]
    line = fails(backfill_argv(items, *extra), capsys)
    assert line.startswith(f"frugalstream: backfill {flag} ") and len(line) < 300
    assert kafka_never_asked == []


def test_report_on_a_file_that_is_not_a_ledger_is_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.sqlite"
    db.write_text("id,text\n1,not a database\n")
    line = fails(["report", "--db", str(db)], capsys)
    assert str(db) in line and "not a readable ledger" in line


def test_report_out_into_a_missing_directory_is_one_line(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ledger.sqlite"
    Ledger(db).close()
    out = tmp_path / "no" / "such" / "report.csv"
    line = fails(["report", "--db", str(db), "--format", "csv", "--out", str(out)], capsys)
    assert "--out" in line and str(out) in line and "No such file or directory" in line


def test_prices_update_from_a_map_that_is_not_an_object_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "map.json"
    src.write_text("[1, 2, 3]")
    out = tmp_path / "prices.json"
    line = fails(["prices", "update", "--source", str(src), "--out", str(out)], capsys)
    assert str(src) in line and "not a price map" in line and "list" in line
    assert not out.exists()


def test_prices_update_over_a_corrupt_catalog_names_it_and_leaves_it_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "map.json"
    src.write_text("{}")
    out = tmp_path / "prices.json"
    out.write_text("{ half written")
    line = fails(["prices", "update", "--source", str(src), "--out", str(out)], capsys)
    assert "--out" in line and str(out) in line and "cannot be read" in line
    assert out.read_text() == "{ half written"


def test_bench_embed_with_a_missing_texts_file_is_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    line = fails(["bench", "embed", "--texts", str(missing), "--int8-only"], capsys)
    assert "--texts" in line and str(missing) in line and "No such file" in line


@pytest.mark.parametrize("bad", ['{"question": "hi"}', '{"text": '])
def test_bench_embed_names_the_json_line_without_a_text(tmp_path: Path, bad: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text(f'plain text\n{bad}\n')
    line = fails(["bench", "embed", "--texts", str(path), "--int8-only"], capsys)
    assert f"{path}:2" in line and "`text`" in line
