"""`prices update --out` that cannot be written (a directory, a path under a file) is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import _clean_config, fails  # noqa: F401 - autouse fixture

MAP = {"gpt-4o": {"litellm_provider": "openai", "input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5,
                  "mode": "chat"}}


@pytest.mark.parametrize("where", ["a-directory", "under-a-file"])
def test_prices_update_out_that_cannot_be_written_is_one_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    src = tmp_path / "map.json"
    src.write_text(json.dumps(MAP))
    if where == "a-directory":
        out = tmp_path / "catalogs"
        out.mkdir()
    else:
        (tmp_path / "notes.txt").write_text("x")
        out = tmp_path / "notes.txt" / "prices.json"
    line = fails(["prices", "update", "--source", str(src), "--out", str(out)], capsys)
    assert "--out" in line
