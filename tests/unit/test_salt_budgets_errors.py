"""Audit sampling salted with a server-side secret (a producer cannot choose which requests are audited), budget
verdicts that read only the asking tenant's budgets, and a summarizer error text that never builds every error."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from pydantic import ValidationError

from frugalstream.classifier.logic import Classifier, Routed
from frugalstream.dedupe.audit_sampling import AuditSampler
from frugalstream.dedupe.lookup import SemanticHit
from frugalstream.gateway.audits import AuditCalls, InProcessCompleted, sample_paid
from frugalstream.gateway.logic import Gateway, Result
from frugalstream.llm.audits import sample_point, sampled
from frugalstream.llm.budgets import BudgetBook
from frugalstream.llm.identity import request_key
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.tokens import TokenCounter
from frugalstream.runtime.settings import MissingKeyFileError, Settings
from frugalstream.schemas import BudgetState, SummarizeJob
from frugalstream.summarizer.app import MAX_DETAIL_CHARS, _describe
from frugalstream.tools.cli import main
from tests.unit.test_audits import entry, long_chat, response, routed
from tests.unit.test_cli_errors import _clean_config  # noqa: F401 - the clean configuration fixture

SECRET = "a-secret-no-producer-knows"
IDS = [f"r{i}" for i in range(400)]


def _unsalted(tenant: str, request_id: str, kind: str) -> float:
    """Today's sampling point: what anyone can compute from the request alone."""
    digest = hashlib.sha256(f"sample\0{kind}\0{request_key(tenant, request_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# --- 1. audit sampling salted with a server-side secret ------------------------------------------------------------

def test_without_a_secret_sampling_is_what_it_was_and_with_one_a_producer_cannot_predict_it() -> None:
    assert all(sample_point("acme", i, "routed_down") == _unsalted("acme", i, "routed_down") for i in IDS)
    key = Settings(audit_sampling_secret=SECRET).audit_sampling_key()
    assert key is not None
    dodging = [i for i in IDS if _unsalted("acme", i, "routed_down") >= 0.05]  # ids a producer would pick
    caught = [i for i in dodging if sampled("acme", i, "routed_down", 0.05, key)]
    assert caught, "with a secret, ids chosen to dodge the audit are audited at the rate like any other"
    assert all(0 <= sample_point("acme", i, "routed_down", key) < 1 for i in IDS)
    other = Settings(audit_sampling_secret="another").audit_sampling_key()
    assert [sampled("acme", i, "routed_down", 0.3, key) for i in IDS] != \
        [sampled("acme", i, "routed_down", 0.3, other) for i in IDS]


def test_the_secret_comes_from_a_mounted_file_as_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "audit_sampling_secret"
    path.write_text(SECRET + "\n")
    from_file = Settings(audit_sampling_secret_file=path).audit_sampling_key()
    assert from_file is not None and from_file == Settings(audit_sampling_secret=SECRET).audit_sampling_key()
    assert Settings(audit_sampling_secret="  ").audit_sampling_key() is None  # compose's empty variable: unset
    unmounted = Settings(audit_sampling_secret_file=tmp_path / "absent")
    with pytest.raises(MissingKeyFileError, match="FRUGAL_AUDIT_SAMPLING_SECRET_FILE"):
        unmounted.audit_sampling_key()
    starts = [lambda: Classifier(unmounted, TokenCounter(), catalog=PriceCatalog.load()),
              lambda: AuditSampler(unmounted), lambda: AuditCalls(unmounted, Gateway({}, InProcessCompleted()))]
    for start in starts:  # each sampling service fails at start, not in a batch
        with pytest.raises(MissingKeyFileError):
            start()


async def test_every_service_that_samples_agrees_under_the_secret() -> None:
    """The classifier keeps the full history for exactly the trims the gateway audits, and dedupe's hits are
    sampled by the same salted hash."""
    settings = Settings(audit_sampling_secret=SECRET, audit_rate=0.5, semantic_verifier="features",
                        context_budgets={"chat": 1_000})
    key = settings.audit_sampling_key()
    ids = IDS[:40]
    salted = [sampled("acme", i, "trimmed", 0.5, key) for i in ids]
    assert salted != [_unsalted("acme", i, "trimmed") < 0.5 for i in ids], "the secret changes the sample"

    classifier = Classifier(settings, TokenCounter(), catalog=PriceCatalog.load())
    results = await classifier.handle([long_chat(i) for i in ids])
    kept = [r.routed for r in results if isinstance(r, Routed)]
    assert [k.route.trimmed_messages > 0 for k in kept] == [True] * len(ids)
    assert [k.audit_messages is not None for k in kept] == salted
    audited = {out.value.request_id for k in kept  # type: ignore[union-attr]
               for out in sample_paid(settings, [Result("k", k, "paid", response(k))])}
    assert audited == {i for i, s in zip(ids, salted, strict=True) if s}

    sampler = AuditSampler(settings)
    hits = [sampler.on_hit(routed(i), SemanticHit(entry(routed("c"), "We open at 9."), 0.93, 0.95, 0.89))
            for i in ids]
    assert [h is not None for h in hits] == [sampled("acme", i, "cache_semantic", 0.5, key) for i in ids]


def test_config_check_warns_that_unsalted_sampling_is_predictable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "config ok" and "FRUGAL_AUDIT_SAMPLING_SECRET" in out.err and "predictable" in out.err
    monkeypatch.setenv("FRUGAL_AUDIT_SAMPLING_SECRET", SECRET)
    assert main(["config", "check"]) == 0
    assert "predictable" not in capsys.readouterr().err
    monkeypatch.delenv("FRUGAL_AUDIT_SAMPLING_SECRET")
    monkeypatch.setenv("FRUGAL_AUDIT_SAMPLING_SECRET_FILE", str(tmp_path / "not-mounted"))
    assert main(["config", "check"]) == 2, "a secret file the services would die of fails the check"
    assert "FRUGAL_AUDIT_SAMPLING_SECRET_FILE" in capsys.readouterr().err


# --- 2. budget verdicts read only the asking tenant's budgets ------------------------------------------------------

NOW = time.time()
TODAY = datetime.fromtimestamp(NOW, UTC).strftime("%Y-%m-%dT00:00:00Z")


def budget(budget_id: str, tenant: str, status: str = "over", action: str = "refuse", tag: str | None = None,
           start: str = TODAY) -> BudgetState:
    return BudgetState(budget_id=budget_id, tenant=tenant, tag=tag, period="day", period_start=start,
                       limit_usd=1, spent_usd=2, status=status, action=action, updated_at=NOW)  # type: ignore[arg-type]


class Foreign:
    """Another tenant's budget state that counts how often a verdict reads it."""

    reads = 0

    def __init__(self, n: int) -> None:
        self.budget_id, self._tenant = f"other-{n:05d}", f"tenant-{n % 500}"

    @property
    def tenant(self) -> str:
        Foreign.reads += 1
        return self._tenant

    def __getattr__(self, name: str) -> object:
        Foreign.reads += 1
        raise AttributeError(name)


def test_a_verdict_reads_only_the_asking_tenants_budgets() -> None:
    """10,000 budgets of other tenants were sorted and read for every request, on the event loop."""
    book = BudgetBook(clock=lambda: NOW)
    book.update(budget("acme-day", "acme"))
    for n in range(10_000):
        book.update(cast(BudgetState, Foreign(n)))
    Foreign.reads = 0
    verdict = book.verdict("acme", {})
    assert verdict is not None and verdict.budget_id == "acme-day"
    assert book.verdict("globex", {}) is None
    assert Foreign.reads == 0, f"a verdict read other tenants' budgets {Foreign.reads} times"


def test_the_tenant_index_keeps_the_last_state_of_a_budget_the_strictest_verdict_and_the_tie_rule() -> None:
    book = BudgetBook(clock=lambda: NOW)
    book.update(budget("b-moved", "acme"))
    book.update(budget("b-moved", "globex"))  # the same budget id, now another tenant's: the last state wins
    assert book.verdict("acme", {}) is None
    moved = book.verdict("globex", {})
    assert moved is not None and moved.tenant == "globex"

    book.update(budget("z-down", "acme", action="downgrade"))
    book.update(budget("y-tag", "acme", tag="team=ads"))
    assert book.verdict("acme", {}).budget_id == "z-down"  # type: ignore[union-attr]
    assert book.verdict("acme", {"team": "ads"}).budget_id == "y-tag"  # type: ignore[union-attr]
    book.update(budget("a-down", "acme", action="downgrade"))
    assert book.verdict("acme", {}).budget_id == "a-down"  # type: ignore[union-attr]  # ties: smallest id
    book.update(budget("a-down", "acme", status="ok", action="downgrade"))
    assert book.verdict("acme", {}).budget_id == "z-down"  # type: ignore[union-attr]
    book.update(budget("z-down", "acme", action="downgrade", start="2000-01-01T00:00:00Z"))
    assert book.verdict("acme", {}) is None  # its period has ended: it says nothing


# --- 3. the summarizer describes a part with very many errors without building them all ---------------------------

def _job_error(n: int) -> ValidationError:
    doc = {"job_id": "j1", "tenant": "acme", "instruction": "Summarize.", "items": [1] * n}
    try:
        SummarizeJob.model_validate(doc)
    except ValidationError as exc:
        return exc
    raise AssertionError("the part is invalid")


def _whole(exc: ValidationError) -> str:
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['type']}" for e in exc.errors())
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def _best(fn: object, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def test_the_description_of_an_invalid_part_is_what_every_error_would_give() -> None:
    for n in (1, 3, 5_000):
        exc = _job_error(n)
        assert _describe(exc) == _whole(exc)


def test_an_invalid_part_with_very_many_errors_is_described_for_far_less_than_its_validation() -> None:
    """`errors()` made Python objects of every error, holding the GIL: seconds for a part of 300,000 errors."""
    exc = _job_error(200_000)
    validating = _best(lambda: _job_error(200_000))
    describing = _best(lambda: _describe(exc))
    assert describing < 2 * validating, f"describe {describing:.3f}s, validate {validating:.3f}s"  # was 7x
