"""The deployment files against the code they run: what a pod can write, which key files a service reads, how
compose's empty variables meet the documented `_FILE` settings, and `config check` refusing what a service would
die of at start."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from frugalstream.gateway.app import wire as wire_gateway
from frugalstream.resources import Resources
from frugalstream.runtime.settings import MissingKeyFileError, Settings, UsageError
from frugalstream.tools.cli import main
from tests.unit.test_cli_errors import _clean_config  # noqa: F401 - the clean configuration fixture
from tests.unit.test_deploy import DEPLOY, LAYOUTS, _k8s

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read the deploy manifests")


@pytest.fixture(autouse=True)
def _not_idempotent(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI tests' clean configuration (`_clean_config`, set up first), with a producer that needs no broker
    to start."""
    request.getfixturevalue("_clean_config")
    monkeypatch.setenv("FRUGAL_KAFKA_IDEMPOTENT", "false")


def _image_uid() -> int:
    found = re.search(r"useradd[^\n]*--uid (\d+)", (DEPLOY / "Dockerfile").read_text())
    assert found, "the Dockerfile creates its user with a fixed uid"
    return int(found.group(1))


# --- the image user and the volumes it writes ------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_pods_that_write_a_persistent_volume_can_write_it_as_the_image_user(layout: str) -> None:
    """A fresh PersistentVolume (block storage) has a root-owned 0755 root: without the pod's fsGroup the
    accountant cannot create its ledger (nor the summarizer its store) at FRUGAL_STATE_DIR as uid 10001."""
    uid = _image_uid()
    claimed = 0
    for doc in _k8s(layout):
        if doc["kind"] != "StatefulSet" or not doc["spec"].get("volumeClaimTemplates"):
            continue
        claimed += 1
        context: dict[str, Any] = doc["spec"]["template"]["spec"].get("securityContext") or {}
        assert context.get("fsGroup") == uid, f"{layout}: {doc['metadata']['name']}: {context or 'unset'}"
        assert context.get("runAsUser") == uid and context.get("runAsNonRoot") is True, context
    assert claimed == 2, "the accountant's and the summarizer's StatefulSets"


def test_the_image_user_is_numeric_so_run_as_non_root_can_verify_it() -> None:
    """`USER frugal` (a name) is refused under `runAsNonRoot: true`: 'cannot verify user is non-root'."""
    user = re.search(r"^USER\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert user, "the image names its user"
    assert user.group(1).split(":")[0] == str(_image_uid()), f"USER {user.group(1)} is not the numeric uid"


# --- provider keys: only those of the providers in use ----------------------------------------------------------

def _k8s_environment(secrets: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base ConfigMap as the pod's environment, its secret and state paths moved under tmp_path."""
    data = next(d for d in _k8s("base") if d["kind"] == "ConfigMap")["data"]
    for name, value in data.items():
        monkeypatch.setenv(name, value.replace("/var/run/secrets/frugal", str(secrets))
                           .replace("/var/lib/frugalstream", str(state)))


def test_the_k8s_gateway_starts_with_only_the_key_of_its_configured_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The ConfigMap names both providers' key files; an OpenAI user's Secret holds the OpenAI key alone. The
    gateway starts (no crash loop on a key nobody asked for) and `config check` agrees."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "openai_api_key").write_text("sk-test-only-openai\n")
    _k8s_environment(secrets, tmp_path / "state", monkeypatch)
    assert os.environ["FRUGAL_ANTHROPIC_API_KEY_FILE"].startswith(str(secrets))
    service = wire_gateway(Resources(Settings()))
    assert set(service.logic.providers) == {"openai"}  # a pin to a claude model: "provider not configured"
    capsys.readouterr()
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out.strip() == "config ok"


def test_a_provider_a_tier_model_is_at_is_refused_at_start_without_its_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A key file may be missing only while no model in use is at its provider: a claude fallback in a tier
    needs the Anthropic key, and the gateway and `config check` both refuse its absence naming the setting."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "openai_api_key").write_text("sk-test-only-openai\n")
    _k8s_environment(secrets, tmp_path / "state", monkeypatch)
    monkeypatch.setenv("FRUGAL_TIERS__LARGE", '["gpt-4o", "claude-sonnet-4-5"]')
    with pytest.raises(MissingKeyFileError, match="FRUGAL_ANTHROPIC_API_KEY_FILE"):
        wire_gateway(Resources(Settings()))
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert "FRUGAL_ANTHROPIC_API_KEY_FILE" in err and len(err.strip().splitlines()) == 1, err


def test_compose_empty_key_variable_does_not_hide_the_documented_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compose passes `FRUGAL_OPENAI_API_KEY: ${OPENAI_API_KEY:-}`, i.e. "" when the key is kept out of the
    environment: an empty variable is no key, so the documented `_FILE` is used instead of ''."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["x-frugal"]["environment"]["FRUGAL_OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"
    key_file = tmp_path / "openai_api_key"
    key_file.write_text("sk-from-the-mounted-secret\n")
    monkeypatch.setenv("FRUGAL_OPENAI_API_KEY", "")
    monkeypatch.setenv("FRUGAL_OPENAI_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("FRUGAL_ANTHROPIC_API_KEY", "")
    s = Settings()
    assert s.secret(s.openai_api_key, s.openai_api_key_file) == "sk-from-the-mounted-secret"
    assert s.anthropic_api_key is None


# --- config check refuses what a service dies of ------------------------------------------------------------------

def _gateway_start_error() -> Exception | None:
    try:
        wire_gateway(Resources(Settings()))
    except Exception as exc:  # what `serve gateway` dies of
        return exc
    return None


def _refused(name: str, capsys: pytest.CaptureFixture[str]) -> str:
    status = main(["config", "check"])
    out = capsys.readouterr()
    assert status == 2 and name in out.err, f"config check: {out.out.strip()!r} (exit {status})"
    return out.err


@pytest.mark.parametrize(("name", "value"), [
    ("FRUGAL_PROVIDER_MAX_ATTEMPTS", "0"),  # RetryPolicy: attempts must be >= 1
    ("FRUGAL_METRICS_PORT", "70000"),  # no socket binds it: the probes never answer
    ("FRUGAL_CACHE_MAX_ENTRIES", "-1"),
    ("FRUGAL_COALESCE_TIMEOUT_S", "-5"),
    ("FRUGAL_KAFKA_FETCH_MAX_WAIT_MS", "-1"),
    ("FRUGAL_MAX_MESSAGE_BYTES", "0"),
    ("FRUGAL_PROVIDER_TIMEOUT_S", "0"),
])
def test_config_check_refuses_a_value_no_service_can_run_with(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    _refused(name, capsys)


def test_config_check_refuses_the_attempts_the_gateway_refuses_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FRUGAL_PROVIDER_MAX_ATTEMPTS", "0")
    assert _gateway_start_error() is not None
    _refused("FRUGAL_PROVIDER_MAX_ATTEMPTS", capsys)


def test_config_check_refuses_a_key_file_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A mistyped secret mount path: the gateway dies at start (one line naming the setting), and so does the
    check, instead of saying ok."""
    monkeypatch.setenv("FRUGAL_PROVIDER", "openai")
    monkeypatch.setenv("FRUGAL_OPENAI_API_KEY_FILE", str(tmp_path / "no-such-secret"))
    error = _gateway_start_error()
    assert isinstance(error, FileNotFoundError) and isinstance(error, UsageError), error
    assert "FRUGAL_OPENAI_API_KEY_FILE" in str(error)
    assert len(_refused("FRUGAL_OPENAI_API_KEY_FILE", capsys).strip().splitlines()) == 1
