"""Calibration turns score quantiles or a quality target into thresholds and writes a readable config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from frugalstream.runtime.settings import Settings
from frugalstream.tools.calibrate import by_quality, by_share, write_thresholds


def test_by_share_hits_the_requested_shares() -> None:
    scores = np.linspace(0.0, 1.0, 1001)
    cal = by_share(scores, large_share=0.1, mid_share=0.2)
    assert abs(cal.large_share - 0.1) < 0.002 and abs(cal.mid_share - 0.2) < 0.002
    assert cal.mid < cal.large


def test_by_quality_picks_the_smallest_share_that_keeps_the_quality() -> None:
    # 100 prompts; only the 20 highest-scored ones need the strong model.
    scores = np.arange(100, dtype=np.float64)
    weak = np.array([0.0] * 20 + [1.0] * 80)[::-1]
    strong = np.ones(100)
    cal = by_quality(scores, weak, strong, quality=0.95, mid_share=0.0)
    assert cal.quality is not None and cal.quality >= 0.95
    assert abs(cal.large_share - 0.15) < 1e-9  # 15 of the 20 failures are enough for 95%


def test_write_thresholds_keeps_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "frugalstream.toml"
    config.write_text('route_threshold_mid = 0.9\ndefault_baseline_model = "gpt-4.1"\n\n[tiers]\nsmall = ["m"]\n')
    cal = by_share(np.linspace(0, 1, 101), 0.1, 0.1)
    write_thresholds(config, cal)
    data = tomllib.loads(config.read_text())
    assert data["route_threshold_large"] == round(cal.large, 6) and data["tiers"]["small"] == ["m"]
    assert data["default_baseline_model"] == "gpt-4.1"
    monkeypatch.setenv("FRUGAL_CONFIG", str(config))
    assert Settings().route_threshold_mid == round(cal.mid, 6)
