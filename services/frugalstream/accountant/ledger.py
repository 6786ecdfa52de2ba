"""SQLite ledger of cost events: idempotent, exact, and cheap to query for reports and budgets.

Amounts are stored as integers of 1e-10 USD (the precision of the contract), so sums are exact and
`baseline - actual == sum(savings by strategy)` holds to the unit in every total. One row fits SQLite's int64
(about $920M) because `TokenUsage` bounds every token count (10^11: at most ~$1.9e7 per point at the shipped
catalog's highest rates). A *sum* of rows need not fit, and SQLite raises on integer overflow, which would stop
every report and every budget (one tenant's spend stalling all the others'): each amount is summed as two
exact integer sums that cannot overflow (see `_usum`), recombined in Python's unbounded integers. Events are
keyed by their CloudEvents id and inserted with INSERT OR IGNORE, so a redelivered event changes nothing.

Retention (`prune`) goes by when the ledger stored an event, not by the event's own time: a redelivery can
only come from the topic, so an id kept as long as the topic keeps records is never counted twice, and a
record stamped weeks ago by a producer's slow clock is kept as long as any other.

One connection, guarded by a lock: the service calls the ledger through `asyncio.to_thread`, whose pool may
use a different thread each call, so the connection is opened with `check_same_thread=False`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import ValidationError

from frugalstream.llm.pricing.costing import rfc3339
from frugalstream.schemas import CostEvent

UNITS_PER_USD = 10**10
UNATTRIBUTED = "unattributed"
NONE_LABEL = "(none)"
MAX_FILLED_BUCKETS = 10_000
#: What the `items` column counts at most: a producer's count past int64 (the contract bounds it nowhere) failed
#: the insert, and the record, its tokens real, was dead-lettered: its spend left the ledger and every budget.
MAX_ITEMS = 2**63 - 1
_IDS_PER_QUERY = 500  # bound parameters per query (SQLite allows 999 in old builds)
Dimension = Literal["tenant", "model", "task", "strategy", "tag"]
_COLUMNS = {"tenant": "e.tenant", "model": "e.model", "task": "e.task_type"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cost_events (
    id TEXT PRIMARY KEY,
    usage_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT,
    baseline_model TEXT NOT NULL,
    task_type TEXT,
    stage TEXT NOT NULL,
    source TEXT NOT NULL,
    tags TEXT NOT NULL,
    time REAL NOT NULL,
    items INTEGER NOT NULL,
    baseline_u INTEGER NOT NULL,
    actual_u INTEGER NOT NULL,
    saved_u INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    batch INTEGER NOT NULL,
    simulated INTEGER NOT NULL,
    catalog_version TEXT NOT NULL,
    payload TEXT NOT NULL,
    price_unknown INTEGER NOT NULL DEFAULT 0,
    unpriced_models TEXT NOT NULL DEFAULT '[]',
    stored_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cost_events_time ON cost_events (time);
CREATE INDEX IF NOT EXISTS cost_events_tenant_time ON cost_events (tenant, time);
CREATE TABLE IF NOT EXISTS cost_savings (
    event_id TEXT NOT NULL REFERENCES cost_events (id),
    strategy TEXT NOT NULL,
    saved_u INTEGER NOT NULL,
    PRIMARY KEY (event_id, strategy)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cost_tags (
    event_id TEXT NOT NULL REFERENCES cost_events (id),
    tag TEXT NOT NULL,
    PRIMARY KEY (event_id, tag)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cost_tags_tag ON cost_tags (tag, event_id);
"""

_INSERT = """
INSERT OR IGNORE INTO cost_events (id, usage_id, request_id, tenant, model, baseline_model, task_type, stage,
    source, tags, time, items, baseline_u, actual_u, saved_u, estimated, batch, simulated, catalog_version, payload,
    price_unknown, unpriced_models, stored_at)
VALUES (:id, :usage_id, :request_id, :tenant, :model, :baseline_model, :task_type, :stage, :source, :tags, :time,
    :items, :baseline_u, :actual_u, :saved_u, :estimated, :batch, :simulated, :catalog_version, :payload,
    :price_unknown, :unpriced_models, :stored_at)
"""
# Columns added after the first release: a ledger file written before them gains them on open (old rows were
# all priced from the catalog, so the defaults are their true values; their time stands in for when they were
# stored, which no one recorded).
_ADDED_COLUMNS = (
    ("price_unknown", "INTEGER NOT NULL DEFAULT 0"),
    ("unpriced_models", "TEXT NOT NULL DEFAULT '[]'"),
    ("stored_at", "REAL NOT NULL DEFAULT 0"),
)
#: Events deleted per transaction by `prune`: reports and inserts wait for one chunk at most.
PRUNE_CHUNK = 5_000


# Each amount is summed as SUM(x / _SPLIT) and SUM(x % _SPLIT) (SQLite truncates both like C, so
# x == (x / _SPLIT) * _SPLIT + x % _SPLIT for negative x too): every term is below 2**32 in magnitude, so neither
# sum can overflow int64 before two billion rows, and the recombination is exact.
_SPLIT = 2**32


def _usum(expr: str) -> str:
    """Two SQL aggregates (two result columns) that `_units` recombines into the exact SUM(expr)."""
    return f"COALESCE(SUM(({expr}) / {_SPLIT}), 0), COALESCE(SUM(({expr}) % {_SPLIT}), 0)"


def _units(high: Any, low: Any) -> int:
    return int(high) * _SPLIT + int(low)


def _migrate(conn: sqlite3.Connection) -> None:
    have = {str(row[1]) for row in conn.execute("PRAGMA table_info(cost_events)")}
    for name, decl in _ADDED_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE cost_events ADD COLUMN {name} {decl}")
    if "stored_at" not in have:
        conn.execute("UPDATE cost_events SET stored_at = time")
    conn.execute("CREATE INDEX IF NOT EXISTS cost_events_stored ON cost_events (stored_at)")


def to_units(usd: float) -> int:
    """Float USD (already rounded to 1e-10 by the accountant) to integer units, via its shortest repr."""
    return int((Decimal(repr(usd)) * UNITS_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def to_usd(units: int) -> float:
    return units / UNITS_PER_USD + 0.0


def parse_time(text: str) -> float:
    dt = datetime.fromisoformat(text)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _row(event: CostEvent) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """Columns, per-strategy units reconciled to `baseline - actual` exactly, and `key=value` tags.

    A tag whose key holds '=' is kept in the event's payload and `tags` column but not indexed: flattened, it
    would read as another tag (`{"env=prod": "eu"}` as env = "prod=eu") and be charged to that tag's budget.
    `LLMRequest` refuses such keys; this guards the producers that do not go through it (summarize jobs)."""
    d = event.data
    baseline_u, actual_u = to_units(d.baseline_cost_usd), to_units(d.actual_cost_usd)
    savings = {str(s): to_units(v) for s, v in d.savings_by_strategy.items()}
    residual = (baseline_u - actual_u) - sum(savings.values())
    if residual:
        # Only float conversion of large amounts (or a foreign producer) gets here; never lose a unit.
        target = max(savings, key=lambda s: abs(savings[s]), default=UNATTRIBUTED)
        savings[target] = savings.get(target, 0) + residual
    row = {
        "id": event.id, "usage_id": d.usage_id, "request_id": d.request_id, "tenant": d.tenant,
        "model": d.model, "baseline_model": d.baseline_model, "task_type": d.task_type, "stage": d.stage,
        "source": d.source, "tags": json.dumps(d.tags, sort_keys=True), "time": parse_time(event.time),
        "items": min(d.items, MAX_ITEMS),
        "baseline_u": baseline_u, "actual_u": actual_u, "saved_u": baseline_u - actual_u,
        "estimated": int(d.estimated), "batch": int(d.batch), "simulated": int(d.simulated),
        "catalog_version": d.catalog_version, "payload": event.model_dump_json(),
        "price_unknown": int(d.price_unknown), "unpriced_models": json.dumps(list(d.unpriced_models)),
    }
    return row, savings, [f"{k}={v}" for k, v in sorted(d.tags.items()) if "=" not in k]


class Ledger:
    """Append-only store of priced cost events; every query is exact and `since` is a unix time (inclusive)."""

    def __init__(self, path: Path | str = ":memory:", *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: offsets are committed after `add`, so a committed event must survive a power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            with self._conn:
                _migrate(self._conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def add(self, event: CostEvent) -> bool:
        """True if stored, False if an event with this id was already there (nothing changes then)."""
        return self.add_many([event]) == 1

    def add_many(self, events: Iterable[CostEvent]) -> int:
        """Stores a batch in one transaction (one fsync); returns how many were new."""
        return len(self.insert(events))

    def insert(self, events: Iterable[CostEvent]) -> list[str]:
        """Stores a batch in one transaction (one fsync); returns the ids of the events it stored, so a caller
        counts a redelivered event nowhere else either (the accountant's spend metrics count only these)."""
        rows = [_row(e) for e in events]
        added: list[str] = []
        with self._lock, self._conn:
            now = self._clock()
            for row, savings, tags in rows:
                row["stored_at"] = now
                if self._conn.execute(_INSERT, row).rowcount != 1:
                    continue
                added.append(row["id"])
                self._conn.executemany("INSERT INTO cost_savings VALUES (?, ?, ?)",
                                       [(row["id"], s, u) for s, u in savings.items()])
                self._conn.executemany("INSERT INTO cost_tags VALUES (?, ?)", [(row["id"], t) for t in tags])
        return added

    def prune(self, keep_s: float) -> int:
        """Deletes the events stored more than `keep_s` seconds ago, with their savings and tags, a chunk per
        transaction; returns how many went. Audit verdicts are a sample and stay."""
        cutoff, deleted = self._clock() - keep_s, 0
        while True:
            with self._lock, self._conn:
                ids = [(str(r[0]),) for r in self._conn.execute(
                    "SELECT id FROM cost_events WHERE stored_at < ? LIMIT ?", (cutoff, PRUNE_CHUNK))]
                self._conn.executemany("DELETE FROM cost_savings WHERE event_id = ?", ids)
                self._conn.executemany("DELETE FROM cost_tags WHERE event_id = ?", ids)
                self._conn.executemany("DELETE FROM cost_events WHERE id = ?", ids)
            deleted += len(ids)
            if len(ids) < PRUNE_CHUNK:
                return deleted

    def events(self, ids: Iterable[str]) -> dict[str, CostEvent]:
        """The stored events of those of `ids` the ledger holds, as first stored (a payload no longer readable
        is left out)."""
        wanted, found = list(dict.fromkeys(ids)), {}
        for i in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = wanted[i:i + _IDS_PER_QUERY]
            for event_id, payload in self._query(
                    f"SELECT id, payload FROM cost_events WHERE id IN ({', '.join('?' * len(chunk))})", chunk):
                try:
                    found[str(event_id)] = CostEvent.model_validate_json(payload)
                except ValidationError:
                    continue
        return found

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    @staticmethod
    def _where(since: float | None) -> tuple[str, list[Any]]:
        return ("WHERE e.time >= ?", [since]) if since is not None else ("", [])

    def _by_strategy_units(self, since: float | None) -> list[tuple[str, int, int, int]]:
        """(strategy, events, items, saved units), largest saving first (sorted here: an ORDER BY SUM could
        overflow)."""
        where, params = self._where(since)
        rows = [(str(s), int(n), _units(ih, il), _units(uh, ul)) for s, n, ih, il, uh, ul in self._query(
            f"SELECT s.strategy, COUNT(*), {_usum('e.items')}, {_usum('s.saved_u')} FROM cost_savings s "
            f"JOIN cost_events e ON e.id = s.event_id {where} GROUP BY s.strategy", params)]
        return sorted(rows, key=lambda r: (-r[3], r[0]))

    def exact_sums(self, exprs: Sequence[str], where: str = "", params: Sequence[Any] = ()) -> list[int]:
        """The exact, overflow-free sum of each integer SQL expression over `cost_events e` (see `_usum`)."""
        row = self._query(f"SELECT {', '.join(_usum(x) for x in exprs)} FROM cost_events e {where}", params)[0]
        return [_units(row[2 * i], row[2 * i + 1]) for i in range(len(exprs))]

    def totals(self, since: float | None = None) -> dict[str, Any]:
        where, params = self._where(since)
        n, unpriced = self._query(
            f"SELECT COUNT(*), COALESCE(SUM(e.price_unknown), 0) FROM cost_events e {where}", params)[0]
        items, base_u, act_u = self.exact_sums(("e.items", "e.baseline_u", "e.actual_u"), where, params)
        return {
            "requests": int(n), "items": items,
            "baseline_cost_usd": to_usd(base_u), "actual_cost_usd": to_usd(act_u),
            "saved_usd": to_usd(base_u - act_u), "savings_pct": _pct(base_u - act_u, base_u),
            "unpriced_requests": int(unpriced),
            "by_strategy": {s: to_usd(u) for s, _, _, u in self._by_strategy_units(since)},
        }

    def breakdown(self, by: Dimension, since: float | None = None) -> list[dict[str, Any]]:
        """Rows sorted by spend (strategy rows: by saving). Tag rows overlap: an event counts under each tag."""
        where, params = self._where(since)
        if by == "strategy":
            [base_u] = self.exact_sums(("e.baseline_u",), where, params)
            return [{"strategy": s, "requests": n, "items": i, "saved_usd": to_usd(u), "savings_pct": _pct(u, base_u)}
                    for s, n, i, u in self._by_strategy_units(since)]
        if by == "tag":
            key, source = f"COALESCE(t.tag, '{NONE_LABEL}')", "cost_events e LEFT JOIN cost_tags t ON t.event_id = e.id"
        elif by in _COLUMNS:
            key, source = f"COALESCE({_COLUMNS[by]}, '{NONE_LABEL}')", "cost_events e"
        else:
            raise ValueError(f"cannot break down by {by!r}")
        rows = sorted(((str(k), int(n), _units(ih, il), _units(bh, bl), _units(ah, al)) for k, n, ih, il, bh, bl, ah, al
                       in self._query(f"SELECT {key} AS k, COUNT(*), {_usum('e.items')}, {_usum('e.baseline_u')}, "
                                      f"{_usum('e.actual_u')} FROM {source} {where} GROUP BY k", params)),
                      key=lambda r: (-r[4], r[0]))
        return [{by: k, "requests": n, "items": i, "baseline_cost_usd": to_usd(b), "actual_cost_usd": to_usd(a),
                 "saved_usd": to_usd(b - a), "savings_pct": _pct(b - a, b)} for k, n, i, b, a in rows]

    def timeseries(self, bucket_s: float, since: float | None = None) -> list[dict[str, Any]]:
        """Per-bucket spend, baseline and saving, with empty buckets filled by zeros so charts don't lie."""
        if bucket_s <= 0:
            raise ValueError("bucket_s must be positive")
        where, params = self._where(since)
        rows = self._query(
            f"SELECT CAST(e.time / ? AS INTEGER) AS b, COUNT(*), {_usum('e.items')}, {_usum('e.baseline_u')}, "
            f"{_usum('e.actual_u')} FROM cost_events e {where} GROUP BY b ORDER BY b", [bucket_s, *params])
        found = {int(b): (int(n), _units(ih, il), _units(bh, bl), _units(ah, al))
                 for b, n, ih, il, bh, bl, ah, al in rows}
        keys = sorted(found)
        if keys and keys[-1] - keys[0] < MAX_FILLED_BUCKETS:
            keys = list(range(keys[0], keys[-1] + 1))
        out = []
        for b in keys:
            n, i, base, act = found.get(b, (0, 0, 0, 0))
            out.append({"t": b * bucket_s, "time": rfc3339(b * bucket_s), "requests": n, "items": i,
                        "baseline_cost_usd": to_usd(base), "actual_cost_usd": to_usd(act),
                        "saved_usd": to_usd(base - act)})
        return out

    def time_span(self, since: float | None = None) -> tuple[float, float] | None:
        """First and last event time, or None for an empty ledger: reports size their time buckets by it."""
        where, params = self._where(since)
        lo, hi = self._query(f"SELECT MIN(e.time), MAX(e.time) FROM cost_events e {where}", params)[0]
        return None if lo is None else (float(lo), float(hi))

    def catalog_versions(self, since: float | None = None) -> list[dict[str, Any]]:
        """Price catalog versions the events were priced with, newest use first, so a report can say how old
        its prices are."""
        where, params = self._where(since)
        rows = self._query(f"SELECT e.catalog_version, COUNT(*), MAX(e.time) FROM cost_events e {where} "
                           "GROUP BY e.catalog_version ORDER BY MAX(e.time) DESC, e.catalog_version", params)
        return [{"catalog_version": str(v), "events": int(n), "last_used": rfc3339(float(t))} for v, n, t in rows]

    def unpriced(self, since: float | None = None) -> list[dict[str, Any]]:
        """Events billed at the conservative rate because the catalog lacked a model, by that model: what a
        report must show so nobody mistakes an estimate for a price."""
        where = "WHERE e.price_unknown = 1" + (" AND e.time >= ?" if since is not None else "")
        rows = sorted(((str(m), int(n), _units(ah, al)) for m, n, ah, al in self._query(
            f"SELECT m.value, COUNT(*), {_usum('e.actual_u')} FROM cost_events e, json_each(e.unpriced_models) m "
            f"{where} GROUP BY m.value", [] if since is None else [since])), key=lambda r: (-r[2], r[0]))
        return [{"model": m, "requests": n, "actual_cost_usd": to_usd(a)} for m, n, a in rows]

    def spent(self, tenant: str, tag: str | None, since: float, until: float) -> float:
        """Actual spend of a tenant (optionally one `key=value` tag) in [since, until) unix time, for budgets."""
        if tag is None:
            sql = (f"SELECT {_usum('e.actual_u')} FROM cost_events e WHERE e.tenant = ? AND e.time >= ? "
                   "AND e.time < ?")
            params: list[Any] = [tenant, since, until]
        else:
            sql = (f"SELECT {_usum('e.actual_u')} FROM cost_events e JOIN cost_tags t ON t.event_id = e.id "
                   "AND t.tag = ? WHERE e.tenant = ? AND e.time >= ? AND e.time < ?")
            params = [tag, tenant, since, until]
        return to_usd(_units(*self._query(sql, params)[0]))
