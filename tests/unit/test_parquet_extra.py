"""Parquet is an extra (pyarrow is 170 MB): without it, a Parquet backfill says what to install, in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from frugalstream.runtime.settings import UsageError
from frugalstream.tools.backfill import read_rows


def test_a_parquet_file_without_pyarrow_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails as on the default install
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "items.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(UsageError, match=r"frugalstream\[parquet\]"):
        read_rows(path)


def test_csv_needs_no_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    path = tmp_path / "items.csv"
    path.write_text("sku,description\na1,red shoe\n")
    assert read_rows(path) == [{"sku": "a1", "description": "red shoe"}]
