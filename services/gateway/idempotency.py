"""Answers already paid for, by request id: a redelivered dispatch re-publishes them instead of paying again."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from schemas import LLMResponse, UsageRecord


class CompletedStore:
    """SQLite, written before the outputs are published, so a crash between the two cannot pay twice."""

    def __init__(self, path: Path | str = ":memory:") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS completed (request_id TEXT PRIMARY KEY, response TEXT NOT NULL, usage TEXT)"
        )
        self._lock = threading.Lock()

    def get(self, request_id: str) -> tuple[LLMResponse, UsageRecord | None] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, usage FROM completed WHERE request_id = ?", (request_id,)
            ).fetchone()
        if row is None:
            return None
        usage = UsageRecord.model_validate_json(row[1]) if row[1] else None
        return LLMResponse.model_validate_json(row[0]), usage

    def put(self, response: LLMResponse, usage: UsageRecord | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO completed (request_id, response, usage) VALUES (?, ?, ?)",
                (response.request_id, response.model_dump_json(), usage.model_dump_json() if usage else None),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
