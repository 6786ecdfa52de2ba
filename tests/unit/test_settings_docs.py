"""Every setting is documented, in a file generated from the settings model that cannot go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugalstream.runtime.settings import Settings, TenantPolicy, TierModels
from frugalstream.tools import settings_docs


def test_every_setting_has_a_description() -> None:
    assert settings_docs.undocumented() == [], "add description= to these fields in runtime/settings.py"


def test_the_committed_doc_is_current() -> None:
    committed = settings_docs.DOC.read_text() if settings_docs.DOC.is_file() else ""
    assert committed == settings_docs.render(), (
        "docs/SETTINGS.md is stale: run .venv/bin/python -m frugalstream.tools.settings_docs")


def test_the_doc_names_every_variable_key_and_allowed_value() -> None:
    doc = settings_docs.render()
    for name, info in Settings.model_fields.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `FRUGAL_{name.upper()}` |"))
        assert f"`{name}`" in row and (info.description or "").split()[0] in row
    assert "`PLAINTEXT` / `SSL` / `SASL_PLAINTEXT` / `SASL_SSL`" in doc  # a Literal lists what is allowed
    assert "integer (>= 6000)" in doc and "`localhost:9092`" in doc  # bounds and defaults
    for model, prefix in ((TierModels, "tiers."), (TenantPolicy, "tenants.NAME.")):
        assert all(f"`{prefix}{name}`" in doc for name in model.model_fields)


def test_check_mode_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "SETTINGS.md"
    assert settings_docs.main(["--out", str(out), "--check"]) == 1
    assert settings_docs.main(["--out", str(out)]) == 0 and out.read_text() == settings_docs.render()
    assert settings_docs.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("Kafka", "Kafak", 1))
    assert settings_docs.main(["--out", str(out), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
