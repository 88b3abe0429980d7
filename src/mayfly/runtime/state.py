"""The runtime's own small durable state: which requests have a result, and
how often each one crashed its coordinator.

Kept in a SQLite file beside the runtime (whichever event log carries the
events), written by the dispatcher and by coordinator processes, so it
survives a ``kill -9`` of either. Like the embedded event log, the file is
marked (``PRAGMA application_id``) when created: a file there that is not
Mayfly's runtime state is refused untouched, and a corrupt one is an
:class:`~mayfly.errors.UnusableFileError` naming it, not a traceback.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mayfly.errors import UnusableFileError

__all__ = ["APPLICATION_ID", "RuntimeState", "request_identity"]

#: ``PRAGMA application_id`` of the runtime's state file ("MFRS" in ASCII).
APPLICATION_ID = 0x4D465253
_VERSION = 1
_TABLES = frozenset({"results", "crashes"})
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS results (request_id TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS crashes (request_id TEXT PRIMARY KEY, count INTEGER NOT NULL)"
    " WITHOUT ROWID",
)
_UNUSABLE = frozenset(
    {
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_PERM,
    }
)
_REMEDY = "move it aside and Mayfly starts a new one"

_T = TypeVar("_T")


def request_identity(source: str, request_id: str) -> str:
    """A request's key in the state: its source and its id (a newline cannot be
    in either: ids are visible ASCII, attributes carry no control character)."""
    return f"{source}\n{request_id}"


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
            self._make_folder()
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            try:
                self._claim(db)
                db.execute("PRAGMA journal_mode=WAL")
                # NORMAL: a mark survives any process kill (a committed WAL frame
                # is in the page cache), not a power cut, and costs no fsync on
                # the dispatcher's loop (0.36 ms a mark with FULL here, more under
                # load). A mark lost that way only lets a request with a durable
                # result run again: at least once, applied once by the devices,
                # the results topic being what is true.
                db.execute("PRAGMA synchronous=NORMAL")
            except BaseException:
                db.close()
                raise
            self._db, self._pid = db, os.getpid()
        return self._db

    def _error(self, reason: str) -> UnusableFileError:
        return UnusableFileError(self.path, reason, label="runtime state ")

    def _make_folder(self) -> None:
        # Only SQLite opens the file itself: closing another descriptor on it would
        # drop this process's POSIX locks there. Garbage is SQLITE_NOTADB on first read.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create its folder: {exc.strerror or exc}") from exc

    def _claim(self, db: sqlite3.Connection) -> None:
        """Create and mark a new file, mark one from before the mark (exactly our
        tables), refuse any other without writing to it."""
        marks = (
            db.execute("PRAGMA application_id").fetchone()[0],
            db.execute("PRAGMA user_version").fetchone()[0],
        )
        if marks == (APPLICATION_ID, _VERSION):
            return
        rows = db.execute(
            "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'"
        )
        names = frozenset(name for (name,) in rows)
        if marks[0] != 0 or (names and names != _TABLES):
            raise self._error(f"not Mayfly's runtime state, left untouched; {_REMEDY}")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID:d}")
            db.execute(f"PRAGMA user_version={_VERSION:d}")
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return work(self._conn())
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in _UNUSABLE:
                raise
            why = {
                sqlite3.SQLITE_CORRUPT: "corrupt",
                sqlite3.SQLITE_NOTADB: "not a SQLite database",
            }
            raise self._error(f"{why.get(code, 'cannot be written')} ({exc}); {_REMEDY}") from exc

    def check(self) -> None:
        """Open the file now and read all of it, so a damaged one stops a start.

        Raises:
            UnusableFileError: it is not Mayfly's runtime state, or is corrupt.
        """
        problems = self._run(lambda db: db.execute("PRAGMA quick_check(5)").fetchall())
        if problems != [("ok",)]:
            raise self._error(f"corrupt: {problems[0][0]}; {_REMEDY}")

    def has_result(self, request_id: str) -> bool:
        """Whether the request (its :func:`request_identity`) has a durable result;
        a mark from before identities (the bare id) counts too, so requests
        redelivered across an upgrade are not run again."""
        query = "SELECT 1 FROM results WHERE request_id IN (?, ?)"
        bare = request_id.rpartition("\n")[2]
        found = self._run(lambda db: db.execute(query, (request_id, bare)).fetchone())
        return found is not None

    def mark_result(self, request_id: str) -> None:
        query = "INSERT OR IGNORE INTO results (request_id) VALUES (?)"
        self._run(lambda db: db.execute(query, (request_id,)))

    def add_crash(self, request_id: str) -> int:
        """Count one more crash; returns the total."""

        def add(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO crashes (request_id, count) VALUES (?, 1) "
                "ON CONFLICT(request_id) DO UPDATE SET count = count + 1",
                (request_id,),
            )
            row = db.execute(
                "SELECT count FROM crashes WHERE request_id = ?", (request_id,)
            ).fetchone()
            return int(row[0])

        return self._run(add)

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None
