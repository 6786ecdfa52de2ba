"""The summarizer's SQLite state: reusable summaries across jobs, and each job part's plan and finished calls.

Every statement runs on one worker thread per store, so the event loop never waits on the disk and the
connection is only ever used by one thread at a time. A write is handed to that thread in the same step in
which a model answer arrives (no await in between) and is shielded from cancellation, so a cancelled
summarizer still keeps every answer it paid for; `aclose` runs after the writes already handed over, so a
summarizer started after it sees them. WAL with synchronous=NORMAL survives a process crash (not a power
loss) and costs well under a millisecond per call, which is nothing next to a model call.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (scope TEXT NOT NULL, digest TEXT NOT NULL, summary TEXT NOT NULL,
    item_id TEXT NOT NULL, job_id TEXT NOT NULL, simulated INTEGER NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (scope, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plans (job_key TEXT PRIMARY KEY, job_id TEXT NOT NULL, tenant TEXT NOT NULL,
    part INTEGER NOT NULL, parts INTEGER NOT NULL, new_unique INTEGER NOT NULL, plan TEXT NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS plans_job ON plans (tenant, job_id);
CREATE TABLE IF NOT EXISTS results (job_key TEXT NOT NULL, digest TEXT NOT NULL, summary TEXT, error TEXT,
    model TEXT, simulated INTEGER NOT NULL, call_id TEXT NOT NULL, PRIMARY KEY (job_key, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS calls (job_key TEXT NOT NULL, call_id TEXT NOT NULL, job_id TEXT NOT NULL,
    tenant TEXT NOT NULL, digests TEXT NOT NULL, items INTEGER NOT NULL, paid INTEGER NOT NULL, usage TEXT,
    actual TEXT, published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (job_key, call_id));
CREATE INDEX IF NOT EXISTS calls_job ON calls (tenant, job_id);
CREATE TABLE IF NOT EXISTS batches (job_key TEXT PRIMARY KEY, batch_id TEXT NOT NULL, submitted_at REAL NOT NULL);
"""
# Columns added after the first release: (table, column, declaration). A part planned before `run_key` existed
# keeps NULL there and so belongs to no run: it is never counted in, or waited for by, a later run's progress.
_ADDED_COLUMNS = (("plans", "run_key", "TEXT"),)
_ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS plans_run ON plans (run_key, part);"


@dataclass(frozen=True)
class Stored:
    summary: str
    item_id: str
    job_id: str
    simulated: bool


@dataclass(frozen=True)
class Resolved:
    """What one job part got for a content hash: a summary, or a terminal error."""

    summary: str | None
    error: str | None
    model: str | None
    simulated: bool
    call_id: str


@dataclass(frozen=True)
class CallRow:
    call_id: str
    digests: list[str]
    items: int
    paid: bool
    usage: str | None
    actual: str | None
    published: bool


@dataclass(frozen=True)
class NewResult:
    """What one call resolved for a content hash. `reusable` is False for a near-duplicate member: its summary
    was made for another text, so it answers this job part (`results`) but never becomes the summary of the
    member's own text in `summaries`, where any later job would take it as an exact match."""

    digest: str
    summary: str | None
    error: str | None
    item_id: str
    reusable: bool = True


class _Tables:
    """The SQL, synchronous; only `SummaryStore`'s worker thread calls it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            if column not in {str(row[1]) for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._db.executescript(_ADDED_INDEXES)

    def close(self) -> None:
        self._db.close()

    def lookup(self, scope: str, digests: list[str]) -> dict[str, Stored]:
        out: dict[str, Stored] = {}
        for start in range(0, len(digests), 500):
            chunk = digests[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for d, s, item, job, sim in self._db.execute(
                    f"SELECT digest, summary, item_id, job_id, simulated FROM summaries WHERE scope = ? "
                    f"AND digest IN ({marks})", [scope, *chunk]):
                out[d] = Stored(s, item, job, bool(sim))
        return out

    def load_plan(self, job_key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT plan FROM plans WHERE job_key = ?", (job_key,)).fetchone()
        return json.loads(row[0]) if row else None

    def save_plan(self, job_key: str, job_id: str, tenant: str, part: int, parts: int, new_unique: int,
                  plan: dict[str, Any], run_key: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO plans (job_key, job_id, tenant, part, parts, new_unique, plan, "
                         "run_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (job_key, job_id, tenant, part, parts, new_unique, json.dumps(plan, separators=(",", ":")),
                          run_key))

    # Everything below that spans parts is per run (`SummarizeJob.run_key`), not per (tenant, job_id): a job id
    # reused with other content is another job, and yesterday's parts must neither hold up nor finish today's.

    def earlier_part_pending(self, run_key: str, part: int) -> bool:
        row = self._db.execute("SELECT 1 FROM plans WHERE run_key = ? AND part < ? AND finished = 0 LIMIT 1",
                               (run_key, part)).fetchone()
        return row is not None

    def job_digests(self, run_key: str) -> set[str]:
        """Content hashes earlier parts of this run already resolved (so they are not new unique items)."""
        rows = self._db.execute("SELECT r.digest FROM results r JOIN plans p ON p.job_key = r.job_key "
                                "WHERE p.run_key = ?", (run_key,))
        return {d for (d,) in rows}

    def record_call(self, *, job_key: str, job_id: str, tenant: str, call_id: str, scope: str, model: str | None,
                    simulated: bool, results: list[NewResult], items: int, paid: bool, usage: str | None,
                    actual: str | None) -> None:
        """One transaction: the call, what it resolved, and the summaries made for their own text (reusable)."""
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO results (job_key, digest, summary, error, model, simulated, call_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job_key, r.digest, r.summary, r.error, model, int(simulated), call_id) for r in results])
            self._db.executemany(
                "INSERT OR IGNORE INTO summaries (scope, digest, summary, item_id, job_id, simulated, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(scope, r.digest, r.summary, r.item_id, job_id, int(simulated), now)
                 for r in results if r.summary is not None and r.reusable])
            self._db.execute(
                "INSERT OR REPLACE INTO calls (job_key, call_id, job_id, tenant, digests, items, paid, usage, actual) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_key, call_id, job_id, tenant, json.dumps([r.digest for r in results]), items, int(paid),
                 usage, actual))

    def resolved(self, job_key: str) -> dict[str, Resolved]:
        rows = self._db.execute("SELECT digest, summary, error, model, simulated, call_id FROM results "
                                "WHERE job_key = ?", (job_key,))
        return {d: Resolved(s, e, m, bool(sim), c) for d, s, e, m, sim, c in rows}

    def calls(self, job_key: str) -> list[CallRow]:
        rows = self._db.execute("SELECT call_id, digests, items, paid, usage, actual, published FROM calls "
                                "WHERE job_key = ? ORDER BY rowid", (job_key,))
        return [CallRow(c, json.loads(d), n, bool(p), u, a, bool(pub)) for c, d, n, p, u, a, pub in rows]

    def mark_published(self, job_key: str, call_ids: list[str]) -> None:
        self._db.executemany("UPDATE calls SET published = 1 WHERE job_key = ? AND call_id = ?",
                             [(job_key, c) for c in call_ids])

    def finish(self, job_key: str) -> None:
        self._db.execute("UPDATE plans SET finished = 1 WHERE job_key = ?", (job_key,))
        self._db.execute("DELETE FROM batches WHERE job_key = ?", (job_key,))

    def progress(self, run_key: str) -> dict[str, Any]:
        """Counters over every part of a run seen so far, for its progress events and report."""
        parts, unique, finished = self._db.execute(
            "SELECT COALESCE(MAX(parts), 1), COALESCE(SUM(new_unique), 0), COALESCE(SUM(finished), 0) FROM plans "
            "WHERE run_key = ?", (run_key,)).fetchone()
        run_calls = "FROM calls c JOIN plans p ON p.job_key = c.job_key WHERE p.run_key = ?"
        done, calls = self._db.execute(
            f"SELECT COALESCE(SUM(c.items), 0), COALESCE(SUM(c.paid), 0) {run_calls}", (run_key,)).fetchone()
        actual = [a for (a,) in self._db.execute(f"SELECT c.actual {run_calls} AND c.actual IS NOT NULL",
                                                 (run_key,))]
        return {"parts": int(parts), "unique": int(unique), "finished_parts": int(finished), "done": int(done),
                "calls": int(calls), "actual": actual}

    def batch(self, job_key: str) -> str | None:
        row = self._db.execute("SELECT batch_id FROM batches WHERE job_key = ?", (job_key,)).fetchone()
        return str(row[0]) if row else None

    def save_batch(self, job_key: str, batch_id: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO batches (job_key, batch_id, submitted_at) VALUES (?, ?, ?)",
                         (job_key, batch_id, time.time()))

    def drop_batch(self, job_key: str) -> None:
        self._db.execute("DELETE FROM batches WHERE job_key = ?", (job_key,))


class SummaryStore:
    """The tables behind one worker thread (see the module docstring for why writes are shielded)."""

    def __init__(self, path: Path) -> None:
        self._tables = _Tables(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-store")

    def _submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
        """Hands the statement to the worker now, before the caller's next await."""
        return asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args, **kwargs))

    async def _write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.shield(self._submit(fn, *args, **kwargs))

    async def aclose(self) -> None:
        """Queued behind every write already handed over, so none is lost."""
        await self._write(self._tables.close)
        self._thread.shutdown(wait=True)

    async def lookup(self, scope: str, digests: list[str]) -> dict[str, Stored]:
        return await self._submit(self._tables.lookup, scope, digests)

    async def load_plan(self, job_key: str) -> dict[str, Any] | None:
        return await self._submit(self._tables.load_plan, job_key)

    async def save_plan(self, job_key: str, job_id: str, tenant: str, part: int, parts: int, new_unique: int,
                        plan: dict[str, Any], *, run_key: str) -> None:
        await self._write(self._tables.save_plan, job_key, job_id, tenant, part, parts, new_unique, plan, run_key)

    async def earlier_part_pending(self, run_key: str, part: int) -> bool:
        return await self._submit(self._tables.earlier_part_pending, run_key, part)

    async def job_digests(self, run_key: str) -> set[str]:
        return await self._submit(self._tables.job_digests, run_key)

    async def record_call(self, *, job_key: str, job_id: str, tenant: str, call_id: str, scope: str,
                          model: str | None, simulated: bool, results: list[NewResult], items: int, paid: bool,
                          usage: str | None, actual: str | None) -> None:
        await self._write(self._tables.record_call, job_key=job_key, job_id=job_id, tenant=tenant, call_id=call_id,
                          scope=scope, model=model, simulated=simulated, results=results, items=items, paid=paid,
                          usage=usage, actual=actual)

    async def resolved(self, job_key: str) -> dict[str, Resolved]:
        return await self._submit(self._tables.resolved, job_key)

    async def calls(self, job_key: str) -> list[CallRow]:
        return await self._submit(self._tables.calls, job_key)

    async def mark_published(self, job_key: str, call_ids: list[str]) -> None:
        await self._write(self._tables.mark_published, job_key, call_ids)

    async def finish(self, job_key: str) -> None:
        await self._write(self._tables.finish, job_key)

    async def progress(self, run_key: str) -> dict[str, Any]:
        return await self._submit(self._tables.progress, run_key)

    async def batch(self, job_key: str) -> str | None:
        return await self._submit(self._tables.batch, job_key)

    async def save_batch(self, job_key: str, batch_id: str) -> None:
        await self._write(self._tables.save_batch, job_key, batch_id)

    async def drop_batch(self, job_key: str) -> None:
        await self._write(self._tables.drop_batch, job_key)
