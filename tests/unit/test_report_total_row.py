"""A group named like the total row's label cannot pass for the total, in CSV or HTML."""

from __future__ import annotations

import csv
import io
import re

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.report import TOTAL_LABEL, build_report, render
from frugalstream.llm.pricing.costing import cost_event
from tests.unit.test_accounting_hardening import CATALOG, rec


def _ledger_with_a_tenant_named_total() -> Ledger:
    led = Ledger()
    for i, tenant in enumerate(("acme", TOTAL_LABEL, "acme")):
        led.add(cost_event(rec(i, tenant), CATALOG))
    return led


def test_csv_marks_the_total_row_apart_from_a_tenant_named_like_it() -> None:
    with _ledger_with_a_tenant_named_total() as led:
        rows = list(csv.DictReader(io.StringIO(render(build_report(led, by="tenant"), "csv"), newline="")))
    assert [r["tenant"] for r in rows] == ["acme", TOTAL_LABEL, TOTAL_LABEL]  # the name alone cannot tell them
    assert list(rows[0])[-1] == "is_total"
    totals = [r for r in rows if r["is_total"] == "true"]
    groups = [r for r in rows if r["is_total"] == "false"]
    assert len(totals) == 1 and len(groups) == 2
    assert float(totals[0]["actual_cost_usd"]) == sum(float(r["actual_cost_usd"]) for r in groups)
    assert float(totals[0]["requests"]) == 3


def test_html_puts_the_total_in_the_footer_and_a_tenant_named_like_it_in_the_body() -> None:
    with _ledger_with_a_tenant_named_total() as led:
        html = render(build_report(led, by="tenant"), "html")
    body = re.search(r"<tbody>(.*?)</tbody>", html, re.S)
    foot = re.search(r"<tfoot>(.*?)</tfoot>", html, re.S)
    assert body is not None and foot is not None
    assert body.group(1).count("<tr>") == 2 and TOTAL_LABEL in body.group(1)
    assert foot.group(1).count("<tr>") == 1 and f"<td>{TOTAL_LABEL}</td>" in foot.group(1)
