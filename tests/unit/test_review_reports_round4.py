"""Round 4 of the hostile review: the audit review page and the cost reports, against names and texts a hostile
tenant chose. A report's rows are what its CSV reader sees, a name is shown as the characters it holds (never as
terminal control, never as another name), and a reviewer sees every hidden character of the texts judged."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.report import build_report, render
from frugalstream.llm.audits import answers_digest
from frugalstream.llm.pricing.costing import cost_event
from frugalstream.runtime.settings import Settings
from frugalstream.schemas.audits import AuditAnswer, AuditRecord
from frugalstream.tools.audit_review import cli
from frugalstream.tools.audit_review.app import ReviewSession, build_app
from frugalstream.tools.audit_review.serve import base_url, page_url, review_server
from frugalstream.tools.cli import main
from tests.unit.test_accounting_hardening import CATALOG, _audit, rec
from tests.unit.test_audit_review import MemoryStore

# A bare CR ends a CSV row for spreadsheets and Python's reader alike: left unquoted, the rest of the name starts
# a new row, its first cell a formula, or a second "(total)" row (carrying this tenant's numbers).
CR_FORMULA = "x\r=cmd|' /C calc'!A0"
CR_TOTAL = "y\r(total)"
TERMINAL = "evil\x1b[2J\x1b[1A\x1b]52;c;aGVsbG8=\x1b\\x"  # clear screen, cursor up, OSC 52 (writes the clipboard)
LOOKALIKES = ("\u202eemca", "ac\u200bme", "acme\u00a0")  # each shows as "acme" unless its hidden character shows
HIDDEN = ("\x1b", "\u202e", "\u200b", "\u00a0", "\u2066")


def _hostile_names_ledger() -> Ledger:
    led = Ledger()
    for i, tenant in enumerate((CR_FORMULA, CR_TOTAL, TERMINAL, "acme", "two\nlines", *LOOKALIKES)):
        led.add(cost_event(rec(i, tenant), CATALOG))
    _audit(led, "a1", CR_FORMULA)
    _audit(led, "a2", TERMINAL)
    _audit(led, "a3", LOOKALIKES[0])
    return led


def test_csv_report_keeps_a_carriage_return_inside_its_cell() -> None:
    with _hostile_names_ledger() as led:
        text = render(build_report(led, by="tenant"), "csv")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    firsts = [row[0] for row in rows if row]
    assert CR_FORMULA in firsts and CR_TOTAL in firsts  # each name read back whole, in one cell
    assert firsts.count(CR_FORMULA) == 2  # the breakdown's row and the audit estimates' row
    assert firsts.count("(total)") == 1  # the real one only
    assert not [c for row in rows for c in row if c.startswith("=")]


def test_table_report_shows_control_and_invisible_characters_escaped() -> None:
    with _hostile_names_ledger() as led:
        text = render(build_report(led, by="tenant"), "table")
    assert not [c for c in (*HIDDEN, "\r") if c in text]  # nothing reaches the terminal as control
    assert "evil\\x1b[2J\\x1b[1A\\x1b]52;c;aGVsbG8=\\x1b\\x" in text
    assert "\\u202eemca" in text and "ac\\u200bme" in text and "acme\\xa0" in text and "two\\nlines" in text
    assert text.count("\\u202eemca") == 2  # the breakdown's row and the audit estimates' row


def test_html_report_shows_invisible_characters_escaped() -> None:
    with _hostile_names_ledger() as led:
        text = render(build_report(led, by="tenant"), "html")
    assert not [c for c in HIDDEN if c in text]
    assert text.count("\\u202eemca") == 2 and "ac\\u200bme" in text and "acme\\xa0" in text


def _record(question: str, served: str) -> AuditRecord:
    return AuditRecord(audit_id="audit-1", tenant="acme", request_id="r", kind="routed_down", task_type="faq",
                       question=question, candidate=AuditAnswer(content=served, model="gpt-4o-mini"),
                       reference=AuditAnswer(content="The fee is $100.", model="gpt-4o"), judge="match",
                       verdict="reject", estimate={"tenant": "acme", "task_type": "faq", "kind": "routed_down",
                                                   "n": 1, "accepted": 0, "rate": 0.0, "low": 0.0, "high": 0.8},
                       judged_at=1.0)


def test_review_page_shows_the_hidden_characters_of_what_is_judged() -> None:
    served = "The fee is $\u202e001\u202c.\nPa\u200bris\tok\x1b[2J \u2066x\u2069"  # reads "$100." in a browser
    record = _record("Wh\u200bat is the fee?", served)
    store = MemoryStore([record])
    session = ReviewSession("acme", [record], store, reviewer="ann")
    with TestClient(build_app(session), base_url="http://127.0.0.1") as client:
        h = {"x-review-token": session.token}
        item = client.get("/api/state", headers=h).json()["item"]
        assert not [c for c in HIDDEN if c in item["served"] + item["question"]]
        assert item["served"] == ("The fee is $\\u202e001\\u202c.\nPa\\u200bris\tok\\x1b[2J \\u2066x\\u2069")
        assert item["question"] == "Wh\\u200bat is the fee?" and item["baseline"] == "The fee is $100."
        assert item["answers_sha256"] == answers_digest(record.candidate, record.reference)  # of the real text
        assert client.post("/api/verdict", headers=h, json={**item, "verdict": "reject"}).status_code == 200
    assert [v.verdict for v in store.published] == ["reject"]


def test_html_report_of_an_event_in_the_last_hours_of_year_9999_renders() -> None:
    """A valid RFC 3339 time a careless producer wrote: the chart's axis ends one bucket later, past year 9999,
    where `datetime` stops; the report of every tenant must not die of one record."""
    last = datetime(9999, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    with Ledger() as led:
        led.add(cost_event(rec(1, "acme").model_copy(update={"occurred_at": last}), CATALOG))
        led.add(cost_event(rec(2, "globex"), CATALOG))
        html = render(build_report(led), "html")
        assert "globex" in html and "9999-12-31" in html
    with Ledger() as single:  # one event in the last second: the axis ends a second later, past year 9999
        at = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
        single.add(cost_event(rec(3, "acme").model_copy(update={"occurred_at": at}), CATALOG))
        assert "9999-12-31 23:59:59 UTC" in render(build_report(single), "html")


class _Broker(MemoryStore):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def test_import_reports_a_rows_audit_id_without_its_control_characters_and_cut_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The file comes from a reviewer; its ids are printed to the operator's terminal with each rejection."""
    monkeypatch.setattr(cli, "_settings", lambda command: Settings())
    monkeypatch.setattr(cli, "_store", lambda settings: _Broker())
    hostile = "\x1b]52;c;aGVsbG8=\x1b\\\x1b[2J" + "x" * 100_000
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["audit_id", "tenant", "answers_sha256", "verdict"], [hostile, "acme", "0", "accept"]])
    assert main(["audit", "import", str(path)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b]52;c;aGVsbG8=\\x1b\\\\x1b[2J" in err and "unknown audit" in err
    assert len(err) < 400 and err.count("\n") == 1


async def test_a_page_bound_to_another_loopback_address_is_served_at_the_printed_url() -> None:
    """`--host 127.0.0.2` (or `::1`) is this machine only too: the Host check must take the address the URL names."""
    record = _record("q", "a")
    session = ReviewSession("acme", [record], MemoryStore([record]))
    async with review_server(session, host="127.0.0.2") as url, httpx.AsyncClient() as client:
        assert url.startswith("http://127.0.0.2:")
        assert (await client.get(page_url(url, session))).status_code == 200
        rebound = await client.get(page_url(url, session), headers={"host": "evil.example"})
        assert rebound.status_code == 400  # still no other name: DNS rebinding stays out
    assert base_url("::1", 8765) == "http://[::1]:8765/" and base_url("127.0.0.1", 80) == "http://127.0.0.1:80/"
