"""Cost reports from the ledger: terminal table, CSV, JSON, and one self-contained HTML file.

The HTML report is a single file with inline SVG charts and inline CSS, no script and no external
resource, so it can be mailed to finance or archived and still render identically years later.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from frugalstream.accountant import audit_estimates
from frugalstream.accountant.cells import CSV_LINE_END, csv_safe, plain, visible
from frugalstream.accountant.ledger import Dimension, Ledger
from frugalstream.llm.pricing.catalog import age_days
from frugalstream.llm.pricing.costing import rfc3339

Format = Literal["table", "csv", "json", "html"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "html")
TOTAL_LABEL = "(total)"
TOTAL_COLUMN = "is_total"
_SVG_NS = "http://www.w3.org/2000/svg"  # a namespace name, never fetched
_MONEY_KEYS = frozenset({"baseline_cost_usd", "actual_cost_usd", "saved_usd"})
# Chart bucket sizes (seconds); a report takes the smallest that draws its span in at most MAX_POINTS buckets,
# so a three-minute demo is drawn per 10 s and a month per day.
BUCKETS = (1.0, 10.0, 60.0, 600.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)
MAX_POINTS = 120
_LAST_S = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # the last second `datetime` can show


@dataclass(frozen=True)
class Report:
    totals: dict[str, Any]
    by: Dimension
    breakdown: list[dict[str, Any]]
    timeseries: list[dict[str, Any]] = field(default_factory=list)
    unpriced: list[dict[str, Any]] = field(default_factory=list)  # models billed at the conservative rate
    since: float | None = None
    generated_at: float = field(default_factory=time.time)
    title: str = "frugalstream cost report"
    bucket_s: float = 3600.0
    prices: list[dict[str, Any]] = field(default_factory=list)  # catalog versions used, with as_of and age
    audits: list[dict[str, Any]] = field(default_factory=list)  # acceptance per tenant/task/kind (issue 16)
    audit_summary: dict[str, Any] = field(default_factory=dict)


def pick_bucket(span_s: float) -> float:
    """The smallest bucket that draws `span_s` seconds in at most MAX_POINTS buckets."""
    return next((b for b in BUCKETS if span_s / b < MAX_POINTS), BUCKETS[-1])


def prices_age(versions: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Each catalog version with the date its prices were taken (its leading YYYY-MM-DD) and their age."""
    return [{**v, "as_of": v["catalog_version"][:10] if age_days(v["catalog_version"]) is not None else None,
             "age_days": age_days(v["catalog_version"], now)} for v in versions]


def build_report(ledger: Ledger, by: Dimension = "tenant", since: float | None = None,
                 bucket_s: float | None = None, title: str = "frugalstream cost report",
                 now: float | None = None) -> Report:
    """`bucket_s` None: chosen from the span of the data (see `pick_bucket`)."""
    now = time.time() if now is None else now
    if bucket_s is None:
        span = ledger.time_span(since)
        bucket_s = pick_bucket(span[1] - span[0] if span else 0.0)
    return Report(totals=ledger.totals(since), by=by, breakdown=ledger.breakdown(by, since),
                  timeseries=ledger.timeseries(bucket_s, since), unpriced=ledger.unpriced(since), since=since,
                  generated_at=now, title=title, bucket_s=bucket_s,
                  prices=prices_age(ledger.catalog_versions(since), now),
                  audits=(audits := audit_estimates.estimates(ledger, since)),
                  audit_summary=audit_estimates.summary(ledger, audits, since))


def prices_line(report: Report) -> str:
    """How old the prices are: 'prices as of 2026-11-30 (3 days old, catalog 2026-11-30.1)', oldest first."""
    if not report.prices:
        return "prices: no priced events"
    parts = []
    for p in sorted(report.prices, key=lambda p: (p["as_of"] or "", p["catalog_version"])):
        age = f"{p['age_days']} days old" if p["age_days"] is not None else "age unknown"
        parts.append(f"{p['as_of'] or 'undated'} ({age}, catalog {p['catalog_version']}, {p['events']} events)")
    return "prices as of " + "; ".join(parts)


def _oldest(report: Report) -> dict[str, Any]:
    dated = [p for p in report.prices if p["age_days"] is not None]
    return max(dated, key=lambda p: p["age_days"]) if dated else {"as_of": None, "age_days": None}


def usd(value: float) -> str:
    """Enough decimals that a per-request cost of a cheap model is not shown as $0.00."""
    digits = 2 if abs(value) >= 100 else 4 if abs(value) >= 1 else 6
    return f"${value:,.{digits}f}"


def _cell(key: str, value: Any) -> str:
    if key in _MONEY_KEYS:
        return usd(float(value))
    if key.endswith("_pct"):
        return f"{float(value):.1f}%"
    return str(value)


def _total_row(report: Report) -> dict[str, Any]:
    return {report.by: TOTAL_LABEL, **{k: v for k, v in report.totals.items() if k != "by_strategy"}}


def tables(report: Report) -> list[Table]:
    """Rich tables (totals, then the breakdown), for a CLI that prints with colours. Every cell and title is
    `plain` text: names come from producers, and Rich would read them as markup (see `cells`)."""
    totals = Table(title=plain(report.title), show_header=False)
    for key, value in report.totals.items():
        if key != "by_strategy":
            totals.add_row(plain(key), plain(_cell(key, value)))
    totals.add_row(plain("prices"), plain(prices_line(report).removeprefix("prices as of ")))
    out = [totals]
    if report.breakdown:
        columns = list(report.breakdown[0])
        table = Table(title=plain(f"by {report.by}"))
        for col in columns:
            table.add_column(plain(col), justify="left" if col == report.by else "right")
        for row in report.breakdown:
            table.add_row(*(plain(_cell(c, row.get(c, ""))) for c in columns))
        out.append(table)
    if report.unpriced:
        warn = Table(title=plain("models without a catalog price (billed at the catalog's highest rates)"))
        for col in ("model", "requests", "actual_cost_usd"):
            warn.add_column(plain(col), justify="left" if col == "model" else "right")
        for row in report.unpriced:
            warn.add_row(*(plain(_cell(c, row[c])) for c in ("model", "requests", "actual_cost_usd")))
        out.append(warn)
    if report.audits:
        out.append(audit_estimates.rich_table(report.audits, report.audit_summary))
    return out


def render_table(report: Report, width: int = 120) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False)
    for table in tables(report):
        console.print(table)
    return buf.getvalue()


def render_csv(report: Report) -> str:
    """The breakdown rows plus a `(total)` row; full float precision, so sums can be checked. The total row
    also says how old the prices are (`prices_as_of`, `prices_age_days`: the oldest catalog used). Name cells
    that a spreadsheet would run as formulas are quoted (`cells.csv_safe`); lines end in CRLF (`cells.CSV_LINE_END`).
    A group may be named like the total row's label, so the last column, `is_total`, says which row is the total."""
    oldest = _oldest(report)
    total = {**_total_row(report), "prices_as_of": oldest["as_of"], "prices_age_days": oldest["age_days"],
             TOTAL_COLUMN: "true"}
    rows = [*({**r, TOTAL_COLUMN: "false"} for r in report.breakdown), total]
    columns = [*(k for k in rows[0] if k != TOTAL_COLUMN), *(k for k in total if k not in rows[0]), TOTAL_COLUMN]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator=CSV_LINE_END)
    writer.writeheader()
    writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    if report.audits:
        buf.write(audit_estimates.csv_block(report.audits, report.audit_summary))
    return buf.getvalue()


def render_json(report: Report) -> str:
    return json.dumps({
        "title": report.title, "generated_at": rfc3339(report.generated_at),
        "since": rfc3339(report.since) if report.since is not None else None,
        "totals": report.totals, "by": report.by, "breakdown": report.breakdown, "timeseries": report.timeseries,
        "unpriced": report.unpriced, "bucket_s": report.bucket_s, "prices": report.prices,
        "audits": report.audits, "audit_summary": report.audit_summary,
    }, indent=2)


def _empty_svg(width: int, text: str) -> str:
    return f'<svg xmlns="{_SVG_NS}" width="{width}" height="60"><text x="10" y="30">{escape(text)}</text></svg>'


def bucket_label(bucket_s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if bucket_s >= size and bucket_s % size == 0:
            return f"{bucket_s / size:g} {unit}"
    return f"{bucket_s:g} s"


def time_label(t: float, bucket_s: float) -> str:
    """A bucket boundary, as precise as the bucket: seconds for sub-minute buckets, days for daily ones. The
    axis ends a bucket after the last event, which may be past year 9999 (an event time is any RFC 3339 one):
    such a boundary is shown as the last second `datetime` has."""
    fmt = "%Y-%m-%d %H:%M:%S" if bucket_s < 60 else "%Y-%m-%d %H:%M" if bucket_s < 86400 else "%Y-%m-%d"
    return datetime.fromtimestamp(min(t, _LAST_S), UTC).strftime(fmt) + ("" if bucket_s >= 86400 else " UTC")


def _line_chart(points: list[dict[str, Any]], bucket_s: float = 3600.0, width: int = 760, height: int = 280) -> str:
    """Spend and baseline per bucket; the axis runs from the first bucket's start to the last bucket's end."""
    left, right, top, bottom = 80, 20, 20, 40
    if not points:
        return _empty_svg(width, "no data")
    t0, t1 = points[0]["t"], points[-1]["t"]
    ymax = max(max(p["baseline_cost_usd"], p["actual_cost_usd"]) for p in points) or 1.0

    def xy(p: dict[str, Any], key: str) -> str:  # each bucket at its middle, on [first start, last end]
        x = left + (p["t"] + bucket_s / 2 - t0) / (t1 + bucket_s - t0) * (width - left - right)
        y = top + (1 - p[key] / ymax) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    series = (("baseline_cost_usd", "#999999", "baseline (no strategies)", ' stroke-dasharray="6 4"'),
              ("actual_cost_usd", "#1a7f37", "actual spend", ""))
    lines = []
    for key, colour, label, dash in series:
        pts = " ".join(xy(p, key) for p in points)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{pts}">'
                     f"<title>{escape(label)}</title></polyline>")
        if len(points) == 1:
            x, y = xy(points[0], key).split(",")
            lines.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
    y0 = height - bottom
    axis = (f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y0}" stroke="#333"/>'
            f'<line x1="{left}" y1="{y0}" x2="{width - right}" y2="{y0}" stroke="#333"/>'
            f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{escape(usd(ymax))}</text>'
            f'<text x="{left - 6}" y="{y0}" text-anchor="end">$0</text>'
            f'<text x="{left}" y="{height - 12}">{escape(time_label(t0, bucket_s))}</text>'
            f'<text x="{width - right}" y="{height - 12}" text-anchor="end">'
            f'{escape(time_label(t1 + bucket_s, bucket_s))}</text>')
    legend = (f'<text x="{left + 10}" y="{top + 14}" fill="#999999">- - baseline</text>'
              f'<text x="{left + 110}" y="{top + 14}" fill="#1a7f37">— actual</text>')
    return (f'<svg xmlns="{_SVG_NS}" width="{width}" height="{height}" class="line-chart" '
            f'role="img" aria-label="spend vs baseline over time">{axis}{"".join(lines)}{legend}</svg>')


def _bar_chart(by_strategy: dict[str, float], width: int = 760) -> str:
    items = sorted(by_strategy.items(), key=lambda kv: -kv[1])
    if not items:
        return _empty_svg(width, "no savings")
    row, label_w, value_w = 28, 150, 110
    height = row * len(items) + 10
    vmax = max(abs(v) for _, v in items) or 1.0
    bars = []
    for i, (name, value) in enumerate(items):
        y = 5 + i * row
        w = abs(value) / vmax * (width - label_w - value_w)
        colour = "#1a7f37" if value >= 0 else "#cf222e"
        bars.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end">{escape(name)}</text>'
                    f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 10}" fill="{colour}"/>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 17}">{escape(usd(value))}</text>')
    return (f'<svg xmlns="{_SVG_NS}" width="{width}" height="{height}" class="bar-chart" '
            f'role="img" aria-label="savings by strategy">{"".join(bars)}</svg>')


def _html_table(report: Report) -> str:
    """The total row in the table's footer: a group may be named like its label."""
    total = _total_row(report)
    columns = list(report.breakdown[0] if report.breakdown else total)

    def row(r: dict[str, Any]) -> str:
        return "<tr>" + "".join(f"<td>{escape(visible(_cell(c, r.get(c, ''))))}</td>" for c in columns) + "</tr>"

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(row(r) for r in report.breakdown)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody><tfoot>{row(total)}</tfoot></table>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}tfoot td{font-weight:bold}svg text{font-size:12px}"
        ".kpi{display:inline-block;margin-right:2em}"
        ".kpi b{display:block;font-size:1.4em}")


def _unpriced_html(report: Report) -> str:
    if not report.unpriced:
        return ""
    rows = "".join(f"<tr><td>{escape(visible(r['model']))}</td><td>{r['requests']}</td>"
                   f"<td>{escape(usd(r['actual_cost_usd']))}</td></tr>" for r in report.unpriced)
    return ('<h2 class="unpriced">Models without a catalog price</h2><p>Billed at the catalog\'s highest rates '
            "(an upper estimate) until a price is added.</p><table><thead><tr><th>model</th><th>requests</th>"
            f"<th>actual_cost_usd</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(report: Report) -> str:
    t = report.totals
    kpis = "".join(f'<div class="kpi">{escape(label)}<b>{escape(value)}</b></div>' for label, value in (
        ("actual spend", usd(t["actual_cost_usd"])), ("baseline", usd(t["baseline_cost_usd"])),
        ("saved", f'{usd(t["saved_usd"])} ({t["savings_pct"]:.1f}%)'), ("requests", str(t["requests"]))))
    since = f" since {rfc3339(report.since)}" if report.since is not None else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(report.title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{escape(report.title)}</h1>"
            f"<p>generated {escape(rfc3339(report.generated_at))}{escape(since)}</p>{kpis}"
            f"<p class=\"prices\">{escape(prices_line(report))}</p>"
            f"<h2>Spend vs baseline over time (per {escape(bucket_label(report.bucket_s))})</h2>"
            f"{_line_chart(report.timeseries, report.bucket_s)}"
            f"<h2>Savings by strategy</h2>{_bar_chart(t.get('by_strategy', {}))}"
            f"<h2>By {escape(report.by)}</h2>{_html_table(report)}{_unpriced_html(report)}"
            f"{audit_estimates.html_block(report.audits, report.audit_summary) if report.audits else ''}"
            "</body></html>\n")


def render(report: Report, fmt: Format) -> str:
    renderers = {"table": render_table, "csv": render_csv, "json": render_json, "html": render_html}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
    return renderers[fmt](report)
