"""`calibrate` refuses a sample too small to set thresholds from, and warns (stderr and JSON) when the sample is
small or the split it picks sends nearly everything to one tier."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import frugalstream.tools.calibrate as calibrate
from frugalstream.tools.calibrate import MIN_SAMPLES, TRUST_SAMPLES, by_share, warnings
from frugalstream.tools.cli import main


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FRUGAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FRUGAL_CONFIG", str(tmp_path / "frugalstream.toml"))


def sample(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "sample.csv"
    path.write_text("prompt\n" + "".join(f"question number {i}\n" for i in range(n)))
    return path


def fake_scores(values: npt.NDArray[np.float64]) -> object:
    def score(prompts: list[str]) -> npt.NDArray[np.float64]:
        assert len(prompts) == len(values)
        return values
    return score


def test_warnings_name_small_samples_and_one_sided_splits() -> None:
    big = np.linspace(0, 1, 2000)
    assert warnings(by_share(big, 0.10, 0.15)) == []
    small = warnings(by_share(np.linspace(0, 1, TRUST_SAMPLES - 1), 0.10, 0.15))
    assert len(small) == 1 and "small sample" in small[0] and f"{TRUST_SAMPLES - 1} requests" in small[0]
    assert any("to the large tier" in w for w in warnings(by_share(big, 0.97, 0.0)))
    assert any("to the small tier" in w for w in warnings(by_share(big, 0.0, 0.02)))
    assert any("reach the large threshold" in w for w in warnings(by_share(big, 0.005, 0.15)))
    flat = np.full(500, 0.3)  # every score equal: any quantile threshold sends all of them to large
    assert any("100% of requests to the large tier" in w for w in warnings(by_share(flat, 0.10, 0.15)))


def test_too_few_requests_are_refused_unless_forced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = sample(tmp_path, 8)
    argv = ["calibrate", "--requests", str(path), "--prompt-col", "prompt", "--strong-share", "0.1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8 requests is too few" in err and f"at least {MIN_SAMPLES}" in err
    assert not (tmp_path / "frugalstream.toml").exists()
    monkeypatch.setattr(calibrate, "score_prompts", fake_scores(np.linspace(0, 1, 8)))
    assert main([*argv, "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: small sample: 8 requests" in captured.err
    assert any("small sample" in w for w in json.loads(captured.out)["warnings"])
    assert (tmp_path / "frugalstream.toml").exists()


def test_a_one_sided_split_is_warned_and_dry_run_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = sample(tmp_path, 300)
    monkeypatch.setattr(calibrate, "score_prompts", fake_scores(np.full(300, 0.5)))
    argv = ["calibrate", "--requests", str(path), "--prompt-col", "prompt", "--strong-share", "0.1", "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["large_share"] == 1.0 and report["small_share"] == 0.0
    assert any("100% of requests to the large tier" in w for w in report["warnings"])
    assert "warning: these thresholds send 100% of requests to the large tier" in captured.err
    assert "split on 300 requests: small 0.0%, mid 0.0%, large 100.0%" in captured.err
    assert not (tmp_path / "frugalstream.toml").exists()
