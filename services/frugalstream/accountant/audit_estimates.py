"""Audit verdicts in the ledger's database, and the estimates every report format shows.

`llm.audits` records are kept one row per audit id (a person's verdict replaces a machine's, never the other way
round), next to the cost events, so one `--db` carries both. Estimates: per tenant, task type and decision kind,
the acceptance rate with its 95% Wilson interval and sample size; the playbook's number (the share of requests
above the cheapest tier whose cheapest-tier answer was accepted: they could have gone cheaper); and the audit
spend against the gross savings it vouches for (savings in the ledger are already net of it).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from html import escape
from typing import Any

from rich.table import Table

from frugalstream.accountant.cells import CSV_LINE_END, csv_safe, plain, visible
from frugalstream.accountant.ledger import Ledger, to_usd
from frugalstream.llm.audit_stats import Proportion
from frugalstream.schemas.audits import AuditRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_verdicts (
    audit_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    task_type TEXT NOT NULL,
    kind TEXT NOT NULL,
    judge TEXT NOT NULL,
    verdict TEXT NOT NULL,
    judged_at REAL NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_verdicts_time ON audit_verdicts (judged_at);
"""
_UPSERT = """
INSERT INTO audit_verdicts VALUES (:audit_id, :tenant, :task_type, :kind, :judge, :verdict, :judged_at, :payload)
ON CONFLICT(audit_id) DO UPDATE SET judge = excluded.judge, verdict = excluded.verdict,
    judged_at = excluded.judged_at, payload = excluded.payload
WHERE excluded.judge = 'human' OR audit_verdicts.judge != 'human'
"""
COLUMNS = ("tenant", "task_type", "kind", "n", "accepted", "acceptance", "low", "high")


def _ensure(ledger: Ledger) -> None:
    with ledger._lock:
        ledger._conn.executescript(_SCHEMA)


def add_audits(ledger: Ledger, records: Sequence[AuditRecord]) -> None:
    """Stores judged audits (in a worker thread: SQLite blocks); a redelivery changes nothing."""
    _ensure(ledger)
    rows = [{"audit_id": r.audit_id, "tenant": r.tenant, "task_type": r.task_type, "kind": r.kind, "judge": r.judge,
             "verdict": r.verdict, "judged_at": r.judged_at, "payload": r.model_dump_json()} for r in records]
    with ledger._lock, ledger._conn:
        ledger._conn.executemany(_UPSERT, rows)


def estimates(ledger: Ledger, since: float | None = None) -> list[dict[str, Any]]:
    _ensure(ledger)
    where, params = ("WHERE judged_at >= ?", [since]) if since is not None else ("", [])
    rows = ledger._query(
        f"SELECT tenant, task_type, kind, COUNT(*), SUM(verdict = 'accept') FROM audit_verdicts {where} "
        "GROUP BY tenant, task_type, kind ORDER BY tenant, task_type, kind", params)
    out = []
    for tenant, task, kind, n, accepted in rows:
        p = Proportion.of(int(accepted), int(n))
        out.append({"tenant": tenant, "task_type": task, "kind": kind, "n": int(n), "accepted": int(accepted),
                    "acceptance": round(p.rate, 4), "low": round(p.low, 4), "high": round(p.high, 4)})
    return out


def summary(ledger: Ledger, rows: list[dict[str, Any]], since: float | None = None) -> dict[str, Any]:
    """Audit spend, gross savings (before audits) and their ratio; the share that could have gone cheaper."""
    where, params = ("WHERE e.time >= ?", [since]) if since is not None else ("", [])
    spend_u, gross_u = ledger.exact_sums(("CASE WHEN e.stage = 'audit' THEN e.actual_u ELSE 0 END",
                                          "CASE WHEN e.stage != 'audit' THEN e.saved_u ELSE 0 END"), where, params)
    up = [r for r in rows if r["kind"] == "routed_up"]
    cheaper = Proportion.of(sum(r["accepted"] for r in up), sum(r["n"] for r in up))
    return {"audits": sum(r["n"] for r in rows), "audit_spend_usd": to_usd(int(spend_u)),
            "gross_savings_usd": to_usd(int(gross_u)),
            "audit_cost_share": round(int(spend_u) / int(gross_u), 6) if int(gross_u) > 0 else None,
            "could_go_cheaper": round(cheaper.rate, 4) if cheaper.n else None,
            "could_go_cheaper_ci": [round(cheaper.low, 4), round(cheaper.high, 4)] if cheaper.n else None}


def summary_line(s: dict[str, Any]) -> str:
    share = "n/a" if s["audit_cost_share"] is None else f"{100 * s['audit_cost_share']:.2f}%"
    cheaper = "" if s["could_go_cheaper"] is None else (
        f"; could have gone cheaper: {100 * s['could_go_cheaper']:.1f}% "
        f"[{100 * s['could_go_cheaper_ci'][0]:.1f}-{100 * s['could_go_cheaper_ci'][1]:.1f}%]")
    return (f"{s['audits']} audits; audit spend ${s['audit_spend_usd']:,.6f} = {share} of gross savings "
            f"(savings above are net of it){cheaper}")


def rich_table(rows: list[dict[str, Any]], s: dict[str, Any]) -> Table:
    """Cells are `plain` text: a tenant's name is not Rich markup."""
    table = Table(title=plain("audited acceptance (95% Wilson interval)"), caption=plain(summary_line(s)))
    for col in COLUMNS:
        table.add_column(plain(col), justify="left" if col in ("tenant", "task_type", "kind") else "right")
    for r in rows:
        table.add_row(*(plain(f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in COLUMNS))
    return table


def csv_block(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    """A second CSV table after a blank line (only when there are audits), then the summary as key,value. Name
    cells a spreadsheet would run as formulas are quoted (`cells.csv_safe`)."""
    import csv
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=CSV_LINE_END)
    writer.writerow(COLUMNS)
    writer.writerows([[csv_safe(r[c]) for c in COLUMNS] for r in rows])
    for key in ("audits", "audit_spend_usd", "gross_savings_usd", "audit_cost_share", "could_go_cheaper"):
        writer.writerow([key, json.dumps(s[key])])
    return CSV_LINE_END + buf.getvalue()


def html_block(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(visible(str(r[c])))}</td>" for c in COLUMNS) + "</tr>"
                   for r in rows)
    return (f'<h2 class="audits">Audited acceptance (95% interval)</h2><p>{escape(summary_line(s))}</p>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
