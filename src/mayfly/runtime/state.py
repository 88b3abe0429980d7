"""The runtime's own small durable state: which requests have a result, and
how often each one crashed its coordinator.

Kept in a SQLite file beside the runtime (whichever event log carries the
events), written by the dispatcher and by coordinator processes, so it
survives a ``kill -9`` of either.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

__all__ = ["RuntimeState"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (request_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crashes (request_id TEXT PRIMARY KEY, count INTEGER NOT NULL)
    WITHOUT ROWID;
"""


class RuntimeState:
    """Request bookkeeping that must outlive the processes that write it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _conn(self) -> sqlite3.Connection:
        # A connection never crosses fork(): a child opens its own, and leaves
        # the inherited object alone (closing it could disturb the parent's).
        if self._db is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db, self._pid = db, os.getpid()
        return self._db

    def has_result(self, request_id: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM results WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        return row is not None

    def mark_result(self, request_id: str) -> None:
        self._conn().execute("INSERT OR IGNORE INTO results (request_id) VALUES (?)", (request_id,))

    def add_crash(self, request_id: str) -> int:
        """Count one more crash; returns the total."""
        db = self._conn()
        db.execute(
            "INSERT INTO crashes (request_id, count) VALUES (?, 1) "
            "ON CONFLICT(request_id) DO UPDATE SET count = count + 1",
            (request_id,),
        )
        row = db.execute("SELECT count FROM crashes WHERE request_id = ?", (request_id,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None
