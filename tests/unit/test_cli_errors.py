"""Every bad setting, argument or input file is one line on stderr naming it, and exit code 2: no traceback."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from frugalstream.tools.cli import build_parser, main


@pytest.fixture(autouse=True)
def _clean_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No stray `frugalstream.toml` from the working directory, no FRUGAL_ variables from the shell."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("FRUGAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FRUGAL_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("FRUGAL_STATE_DIR", str(tmp_path / "state"))


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return one_line(capsys)


@pytest.mark.parametrize("argv", [["report"], ["topics"], ["config", "check"]])
def test_a_malformed_toml_file_is_named_with_its_position(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "frugalstream.toml"
    bad.write_text('route_threshold_mid = 0.1\ntiers = [\n  "unterminated\n')
    monkeypatch.setenv("FRUGAL_CONFIG", str(bad))
    line = fails(argv, capsys)
    assert str(bad) in line and "not valid TOML" in line and "line 3" in line


def test_a_wrong_env_setting_names_the_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRUGAL_KAFKA_IDEMPOTENT", "maybe")
    line = fails(["report"], capsys)
    assert "FRUGAL_KAFKA_IDEMPOTENT" in line and "'maybe'" in line and "true/false" in line


def test_a_wrong_toml_setting_names_the_key_the_file_and_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "frugalstream.toml"
    config.write_text("route_threshold_mid = 3\n")
    monkeypatch.setenv("FRUGAL_CONFIG", str(config))
    line = fails(["config", "check"], capsys)
    assert "route_threshold_mid" in line and str(config) in line and "less than or equal to 1" in line


def test_config_check_says_ok_on_a_valid_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "frugalstream.toml"
    config.write_text("route_threshold_mid = 0.1\n")
    monkeypatch.setenv("FRUGAL_CONFIG", str(config))
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out.strip() == "config ok"


def test_an_unknown_service_name_lists_the_services(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(["serve", "classifier", "nosuch"], capsys)
    assert "'nosuch'" in line and "classifier" in line and "accountant" in line


def _commands(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, [*prefix, name])
    return found


@pytest.mark.parametrize("argv", _commands(build_parser(), []), ids=lambda a: " ".join(a) or "frugalstream")
def test_every_help_works(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_missing_backfill_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    line = fails(["backfill", str(missing), "--text-col", "text", "--instruction", "Summarize."], capsys)
    assert "backfill FILE" in line and str(missing) in line and "does not exist" in line


def test_a_wrong_id_col_names_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "items.csv"
    data.write_text("id,text\n1,hello\n")
    line = fails(["backfill", str(data), "--text-col", "text", "--id-col", "sku", "--instruction", "S."], capsys)
    assert "--id-col 'sku'" in line and "columns: id, text" in line


def test_a_wrong_deadline_says_what_is_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "items.csv"
    data.write_text("id,text\n1,hello\n")
    line = fails(["backfill", str(data), "--text-col", "text", "--instruction", "S.", "--deadline", "tomorrow"],
                 capsys)
    assert "--deadline" in line and "'tomorrow'" in line and "24h" in line


def test_a_wrong_since_says_what_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(["report", "--since", "yesterday"], capsys)
    assert "--since" in line and "'yesterday'" in line and "ISO" in line and "7d" in line


def test_calibrate_without_a_target_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(["calibrate", "--requests", str(tmp_path / "x.jsonl")], capsys)
    assert "--strong-share" in line and "--target-quality" in line
