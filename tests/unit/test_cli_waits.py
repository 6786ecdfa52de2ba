"""Commands that need Kafka say in one line when nobody answers; long waits say what they wait for."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from frugalstream.schemas import SummarizeProgress, TokenUsage
from frugalstream.tools.backfill import follow_with_progress
from frugalstream.tools.cli import main
from frugalstream.tools.job_report import JobOutcome, OnProgress
from frugalstream.tools.preflight import bootstrap_addresses
from frugalstream.tools.waiting import WaitWatch


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FRUGAL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FRUGAL_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("FRUGAL_STATE_DIR", str(tmp_path / "state"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("command", [["serve"], ["serve", "gateway"], ["topics"], ["backfill"]])
def test_an_unreachable_bootstrap_is_one_line_and_exit_2(
        command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{closed_port()}"
    monkeypatch.setenv("FRUGAL_KAFKA_BOOTSTRAP", address)
    if command == ["backfill"]:
        data = tmp_path / "items.csv"
        data.write_text("text\nhello\n")
        command = ["backfill", str(data), "--text-col", "text", "--instruction", "Summarize."]
    assert main(command) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"FRUGAL_KAFKA_BOOTSTRAP='{address}'" in lines[0] and "cannot reach Kafka" in lines[0]


def test_a_malformed_bootstrap_says_what_is_allowed() -> None:
    assert bootstrap_addresses("a:1, [::1]:9092") == [("a", 1), ("::1", 9092)]
    for bad in ("broker", "broker:", ":9092", "b:99999", "a:1,,b:2"):
        with pytest.raises(ValueError, match=r"FRUGAL_KAFKA_BOOTSTRAP.*host:port"):
            bootstrap_addresses(bad)


def test_a_silent_summarizer_is_named_after_the_quiet_period_and_again_later() -> None:
    watch = WaitWatch(total=10, started=0.0, quiet_after_s=30, repeat_s=300)
    assert watch.observe(0, False, 5.0) == ("0/10 done, 0.0/s", None)
    status, line = watch.observe(0, False, 31.0)
    assert line == status and "no answer from the summarizer for 31 s" in status and "serve summarizer" in status
    assert watch.observe(0, False, 100.0)[1] is None  # said once, not on every poll
    assert watch.observe(0, False, 332.0)[1] is not None  # ... and again after repeat_s
    status, line = watch.observe(4, True, 340.0)
    assert line is not None and "answered again: 4/10" in line and "4/10 done" in status
    status, line = watch.observe(4, True, 400.0)  # answered before, now quiet: a slow batch, not a dead service
    assert "nothing new from the summarizer for 60 s" in status and "4/10 done" in status


class FakeFollower:
    """Replays progress as a summarizer would, one poll per step of the fake clock."""

    job_id = "job-1"

    def __init__(self, steps: list[tuple[SummarizeProgress | None, int]], clock: list[float]) -> None:
        self.steps, self.clock = steps, clock

    async def follow(self, expected: int, timeout_s: float, on_progress: OnProgress | None = None) -> JobOutcome:
        for progress, results in self.steps:
            self.clock[0] += 20.0
            assert on_progress is not None
            on_progress(progress, results)
        return JobOutcome()


def test_backfill_prints_what_it_waits_for_without_a_terminal() -> None:
    clock = [0.0]
    progress = SummarizeProgress(job_id="job-1", tenant="t", total_items=3, done_items=3, unique_items=3,
                                 model_calls=1, usage=TokenUsage(), finished=True)
    follower: Any = FakeFollower([(None, 0), (None, 0), (None, 0), (progress, 3)], clock)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    asyncio.run(follow_with_progress(follower, 3, 60.0, console, "k:9092", clock=lambda: clock[0]))
    text = out.getvalue()
    assert "backfill job-1: no answer from the summarizer for 40 s" in text
    assert "running against k:9092" in text and "answered again: 3/3 done" in text
