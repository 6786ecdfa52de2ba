"""The report draws time at the scale of its data, and says in every format how old its prices are."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime

import pytest

from frugalstream.accountant.ledger import Ledger
from frugalstream.accountant.report import MAX_POINTS, build_report, pick_bucket, render
from frugalstream.llm.pricing.catalog import PriceCatalog
from frugalstream.llm.pricing.costing import cost_event
from tests.unit.test_accounting import point, rec, step

CATALOG = PriceCatalog.load()
T0 = 1_790_000_000.0  # 2026-09-21T13:33:20Z


def ledger_over(span_s: float, n: int = 40) -> Ledger:
    led = Ledger()
    for i in range(n):
        at = T0 + span_s * i / (n - 1)
        led.add(cost_event(rec(i, "acme", point("gpt-4o", input_tokens=1000 + i),
                               step("routed_down", "gpt-4o-mini", input_tokens=1000 + i), at=at), CATALOG))
    return led


def axis_labels(html: str) -> tuple[str, str]:
    svg = re.search(r'<svg[^>]*class="line-chart".*?</svg>', html, re.S)
    assert svg is not None
    labels = re.findall(r'<text x="[\d.]+" y="\d+"(?: text-anchor="end")?>'
                        r"([^<]*\d{2}:\d{2}[^<]*|\d{4}-\d{2}-\d{2})</text>", svg.group(0))
    assert len(labels) == 2, labels
    return labels[0], labels[1]


@pytest.mark.parametrize(("span_s", "largest"), [(180, 10), (3 * 3600, 600), (30 * 86400, 86400)])
def test_buckets_follow_the_span_of_the_data(span_s: float, largest: float) -> None:
    report = build_report(ledger_over(span_s))
    assert report.bucket_s <= largest
    assert 2 <= len(report.timeseries) <= MAX_POINTS
    assert sum(p["requests"] for p in report.timeseries) == 40


def test_a_three_minute_run_is_drawn_in_seconds_with_distinct_ends() -> None:
    report = build_report(ledger_over(180))
    assert report.bucket_s in (1, 10) and len(report.timeseries) >= 10
    start, end = axis_labels(render(report, "html"))
    assert start != end
    t_start = datetime.strptime(start, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC).timestamp()
    t_end = datetime.strptime(end, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC).timestamp()
    assert t_start <= T0 and T0 + 180 < t_end <= T0 + 180 + 2 * report.bucket_s  # the axis covers the run


def test_a_month_is_drawn_in_days() -> None:
    report = build_report(ledger_over(30 * 86400))
    assert report.bucket_s == 86400
    start, end = axis_labels(render(report, "html"))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", start) and start < end
    assert "(per 1 d)" in render(report, "html")


def test_pick_bucket_is_the_smallest_that_fits() -> None:
    assert pick_bucket(0) == 1 and pick_bucket(100) == 1 and pick_bucket(180) == 10
    for span in (5.0, 500.0, 5e4, 5e6):
        b = pick_bucket(span)
        assert span / b < MAX_POINTS


def test_every_format_says_how_old_the_prices_are() -> None:
    led = ledger_over(60, n=3)
    as_of = CATALOG.version[:10]
    now = datetime.fromisoformat(as_of).replace(tzinfo=UTC).timestamp() + 12 * 86400 + 3600
    report = build_report(led, now=now)
    assert "12 days old" in render(report, "table") and as_of in render(report, "table")
    doc = json.loads(render(report, "json"))
    assert doc["prices"] == [{"catalog_version": CATALOG.version, "events": 3, "last_used": doc["prices"][0][
        "last_used"], "as_of": as_of, "age_days": 12}]
    total = list(csv.DictReader(io.StringIO(render(report, "csv"))))[-1]
    assert (total["prices_as_of"], total["prices_age_days"]) == (as_of, "12")
    assert f"prices as of {as_of} (12 days old" in render(report, "html")
    assert "no priced events" in render(build_report(Ledger()), "table")
