"""The demo keeps its run where `frugalstream report` can find it, and never empties a directory not its own."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from frugalstream.runtime.settings import UsageError
from frugalstream.tools.cli import build_parser
from frugalstream.tools.demo import DEFAULT_STATE_DIR, MARKER, prepare_state_dir, report_command


def test_the_default_state_dir_is_persistent_and_local() -> None:
    args = build_parser().parse_args(["demo"])
    assert Path(args.state_dir) == DEFAULT_STATE_DIR == Path(".frugalstream-demo")


def test_a_previous_run_is_replaced(tmp_path: Path) -> None:
    state = prepare_state_dir(tmp_path / "demo")
    assert (state / MARKER).is_file()
    (state / "ledger.sqlite").write_text("old run")
    prepare_state_dir(state)
    assert not (state / "ledger.sqlite").exists() and (state / MARKER).is_file()


def test_a_foreign_directory_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not an earlier demo's state dir"):
        prepare_state_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_state_dir(empty) == empty


def test_the_printed_command_reads_this_runs_ledger(tmp_path: Path) -> None:
    state = tmp_path / "my demo"
    argv = shlex.split(report_command(state))
    assert argv[:2] == ["frugalstream", "report"]
    args = build_parser().parse_args(argv[1:])
    assert Path(args.db) == state / "ledger.sqlite" and args.format == "html"


def test_the_demo_reports_the_latency_of_interactive_requests_apart_from_jobs_that_can_wait() -> None:
    from frugalstream.schemas import LLMRequest, LLMResponse
    from frugalstream.tools.demo import build_report

    def request(rid: str, latency_class: str) -> LLMRequest:
        return LLMRequest.model_validate({"id": rid, "tenant": "acme", "model": "gpt-4o-mini",
                                          "latency_class": latency_class,
                                          "messages": [{"role": "user", "content": "hi"}]})

    requests = [request(f"i{n}", "interactive") for n in range(4)] + [request("w", "within_1h")]
    got = {r.id: [LLMResponse(request_id=r.id, tenant="acme", source="llm", created_at=10.0,
                              responded_at=10.0 + (4.0 if r.id == "w" else 0.1 * (1 + int(r.id[1:]))))]
           for r in requests}
    totals = {"baseline_cost_usd": 1.0, "actual_cost_usd": 0.5, "saved_usd": 0.5, "savings_pct": 50.0,
              "by_strategy": {}}
    report = build_report(requests, got, totals, 1.0)
    assert report["latency_ms_p99"] == pytest.approx(4_000.0)  # every request, the batch job included
    assert report["interactive_latency_ms_p99"] == pytest.approx(400.0)
    assert report["interactive_latency_ms_p50"] == pytest.approx(300.0)
