"""`frugalstream prices update | show`: the catalog is refreshed where services find it, and every rate says
where it came from and when."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from frugalstream.tools.cli import main
from tests.unit.test_price_sources import MAP


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("FRUGAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FRUGAL_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("FRUGAL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def show(model: str, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    assert main(["prices", "show", model, "--json"]) == 0
    info: dict[str, object] = json.loads(capsys.readouterr().out)
    return info


def test_show_says_each_rate_and_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    info = show("gpt-4o-2024-08-06", capsys)
    assert info["catalog_name"] == "gpt-4o" and str(info["catalog_file"]).endswith("data/prices.json")
    rates = {(r["mode"], r["kind"]): r for r in info["rates"]}  # type: ignore[attr-defined]
    assert rates[("standard", "input")]["usd_per_1m"] == "2.50"
    assert rates[("standard", "input")]["source"].startswith("shipped catalog ")
    assert rates[("batch", "cached_input")]["source"].startswith("= cached_input (not listed")
    assert isinstance(info["catalog_age_days"], int) and info["catalog_as_of"]
    assert main(["prices", "show", "gpt-4o"]) == 0
    text = capsys.readouterr().out
    assert "prices as of" in text and "days old" in text and "standard input" in text


def test_update_writes_the_state_dir_catalog_that_show_then_reads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "map.json"
    source.write_text(json.dumps(MAP))
    assert main(["prices", "update", "--source", str(source), "--date", "2026-01-02"]) == 0
    assert (tmp_path / "state" / "prices.json").is_file() and "wrote" in capsys.readouterr().out
    info = show("claude-y", capsys)
    assert info["catalog_as_of"] == "2026-01-02" and str(info["catalog_file"]) == str(tmp_path / "state/prices.json")
    rates = {(r["mode"], r["kind"]): r for r in info["rates"]}  # type: ignore[attr-defined]
    assert rates[("batch", "cache_write")]["usd_per_1m"] == "1.875"
    assert "LiteLLM model price map (litellm unknown" in rates[("batch", "cache_write")]["source"]
    assert "2026-01-02" in rates[("batch", "cache_write")]["source"]
    # The shipped models LiteLLM's (tiny) map lacks are still priced, from the shipped catalog.
    assert show("claude-opus-4", capsys)["catalog_as_of"] == "2026-01-02"


def test_bad_inputs_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prices", "show", "gpt-9o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no price for model 'gpt-9o'" in err and "gpt-4o" in err
    monkeypatch.setenv("FRUGAL_PRICE_CATALOG", str(tmp_path / "nope.json"))
    assert main(["prices", "show", "gpt-4o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FRUGAL_PRICE_CATALOG" in err and "nope.json" in err
    assert main(["prices", "update", "--source", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["prices", "update", "--date", "yesterday"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
