"""The embedded event log: one SQLite file in WAL mode, shaped like Kafka.

Each topic has one partition (0) with dense offsets from 0; consumer groups
store the offset of the next record to read. Many processes share the file at
once (the dispatcher's consumers, short-lived coordinators appending results,
the CLI publishing requests), so:

- every write runs in ``BEGIN IMMEDIATE``: the writer takes the file's write
  lock before reading ``max(offset)``, so two processes can never compute the
  same offset, and a busy file is waited for (``busy_timeout``) then retried;
- connections are per process and opened on first use. A child forked while
  its parent held a connection must not use it, nor close it: closing an
  inherited handle can release the parent's POSIX locks or checkpoint under
  it. The child opens its own and keeps the inherited object referenced
  (``_INHERITED``) so that garbage collection never closes it either.

The file is Mayfly's only if it says so: ``PRAGMA application_id`` is set when
Mayfly creates it and checked on every open, so ``--event-log`` pointed at
another application's database refuses it untouched (no table added, no switch
to WAL) instead of writing into it. A file from before the mark whose tables
are exactly Mayfly's is adopted and marked. A file that is not SQLite, or is
corrupt, is an :class:`~mayfly.errors.EventLogFileError` naming it, whether
found at open or while running; :meth:`SqliteEventLog.check` reads the whole
file (``PRAGMA quick_check``) for ``mayfly up`` to run once at start.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from mayfly.errors import EventLogError, EventLogFileError, GroupBusyError
from mayfly.eventlog import (
    WRITE_SETTLE_S,
    GroupMember,
    Headers,
    LogConsumer,
    LogRecord,
    MultiTopicConsumer,
    Position,
    Rebalance,
    check_record,
)
from mayfly.eventlog.filewatch import FileWatch, watch

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "SqliteEventLog"]

SCHEMA_VERSION = 1
_SCHEMA = (
    # WITHOUT ROWID: records are stored in (topic, offset) order, so max(offset)
    # and a consumer's range scan are one B-tree descent each.
    "CREATE TABLE records (topic TEXT NOT NULL, off INTEGER NOT NULL, key BLOB,"
    " value BLOB NOT NULL, headers BLOB NOT NULL, ts_ms INTEGER NOT NULL,"
    " PRIMARY KEY (topic, off)) WITHOUT ROWID",
    "CREATE TABLE commits (grp TEXT NOT NULL, topic TEXT NOT NULL,"
    " next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic)) WITHOUT ROWID",
)
_APPEND = (
    "INSERT INTO records (topic, off, key, value, headers, ts_ms)"
    " SELECT ?1, coalesce(max(off) + 1, 0), ?2, ?3, ?4, ?5 FROM records WHERE topic = ?1"
)
_FETCH = (
    "SELECT off, key, value, headers, ts_ms FROM records"
    " WHERE topic = ? AND off >= ? ORDER BY off LIMIT ?"
)
_BY_KEY = (
    "SELECT off, key, value, headers, ts_ms FROM records"
    " WHERE topic = ? AND ts_ms >= ? AND key = ? ORDER BY off LIMIT ?"
)
_END = "SELECT coalesce(max(off) + 1, 0) FROM records WHERE topic = ?"
_COMMIT = (
    "INSERT INTO commits (grp, topic, next_offset) VALUES (?, ?, ?)"
    " ON CONFLICT (grp, topic) DO UPDATE SET next_offset = excluded.next_offset"
)
_COMMITTED = "SELECT next_offset FROM commits WHERE grp = ? AND topic = ?"

# How long one operation waits for a busy file: SQLite's busy handler first,
# then our retries for the BUSY cases it does not cover (WAL recovery, a
# snapshot gone stale). Writers hold the lock for about a millisecond, so only a
# wedged process makes anyone wait this long.
_BUSY_TIMEOUT_S = 30.0
_RETRY_SLEEP_S = 0.002
_LEN = struct.Struct(">I")
# A waiting poll sleeps on the file's inotify watch; this often it also asks the
# file itself, in case a write went unseen (a file system without inotify events).
_WATCHED_RECHECK_S = 0.5
# Inherited connections of this process: referenced forever, never closed (see module doc).
_INHERITED: list[sqlite3.Connection] = []

_T = TypeVar("_T")


def _encode_headers(headers: Headers) -> bytes:
    parts: list[bytes] = []
    for name, value in headers:
        if not isinstance(name, str) or not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"a header is a (str, bytes) pair, not ({name!r}, {value!r})")
        # surrogatepass: any str a caller holds comes back equal, even a lone surrogate.
        raw_name, raw_value = name.encode("utf-8", "surrogatepass"), bytes(value)
        parts += (_LEN.pack(len(raw_name)), raw_name, _LEN.pack(len(raw_value)), raw_value)
    return b"".join(parts)


def _decode_headers(data: bytes) -> tuple[tuple[str, bytes], ...]:
    headers: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        (size,) = _LEN.unpack_from(data, pos)
        name = data[pos + 4 : pos + 4 + size].decode("utf-8", "surrogatepass")
        pos += 4 + size
        (size,) = _LEN.unpack_from(data, pos)
        headers.append((name, data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return tuple(headers)


def _is_transient(exc: sqlite3.Error) -> bool:
    # Extended codes (SQLITE_BUSY_SNAPSHOT...) keep the primary code in the low byte.
    code: int = getattr(exc, "sqlite_errorcode", 0)  # absent when raised by the sqlite3 module
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Db:
    """This process's connection to the file, opened on first use, reopened after a fork."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._closed = False

    def run(self, work: Callable[[sqlite3.Connection], _T], *, write: bool = False) -> _T:
        """Run ``work`` (in a ``BEGIN IMMEDIATE`` transaction if ``write``), retrying while busy."""
        if self._pid != os.getpid():
            # A fork: the lock may have been copied held by a thread that is not here.
            if self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn, self._pid, self._lock = None, os.getpid(), threading.Lock()
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        with self._lock:
            while True:
                try:
                    conn = self._conn or self._open()
                    if not write:
                        return work(conn)
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(conn)
                        conn.execute("COMMIT")
                    finally:
                        if conn.in_transaction:  # work or COMMIT failed: nothing was stored
                            conn.execute("ROLLBACK")
                    return result
                except sqlite3.Error as exc:
                    if not _is_transient(exc) or time.monotonic() >= deadline:
                        unusable = _file_error(exc, self.path)
                        raise unusable or EventLogError(f"sqlite:{self.path}: {exc}") from exc
                time.sleep(_RETRY_SLEEP_S)

    def _open(self) -> sqlite3.Connection:
        if self._closed:
            raise EventLogError(f"sqlite:{self.path}: used after close()")
        _prepare_file(self.path)
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            # Before anything is written: another application's file is refused untouched.
            _claim_file(conn, self.path)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit fsyncs the WAL before append/commit returns, so a record
            # survives power loss too, as the port's "durable" promises. NORMAL would
            # survive any process kill (a committed frame sits in the OS page cache) and is
            # about 3.5x faster here, but a power cut could drop the last commits; FULL
            # still gives over 2,000 appends/s (records of ~600 bytes) on a small VM.
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            elif self._conn is not None:
                _INHERITED.append(self._conn)
            self._conn = None


class SqliteEventLog:
    """The :class:`~mayfly.eventlog.EventLog` of the local runtime, in one SQLite file.

    Safe to share between threads, and to use on both sides of a ``fork()``.

    Args:
        path: the database file; it and its folder are created on first use.
        poll_interval_s: how often a waiting ``poll`` checks for new records
            where the kernel cannot tell it of writes (no inotify); with inotify
            it waits for a write instead, and checks every half second anyway.
    """

    def __init__(self, path: Path, *, poll_interval_s: float = 0.005) -> None:
        self._db = _Db(Path(path))
        self._poll_interval_s = poll_interval_s
        self._consumers: weakref.WeakSet[_SqliteConsumer | _SqliteMultiConsumer] = weakref.WeakSet()

    def append(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        """Add a record at the end of ``topic``; return once it is committed to disk.

        Raises:
            EventLogError: the file cannot be written (or stayed locked for 30 s).
        """
        check_record(key, value)
        params = (topic, key, value, _encode_headers(headers), time.time_ns() // 1_000_000)
        self._db.run(lambda conn: conn.execute(_APPEND, params), write=True)

    def append_many(self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]) -> None:
        """Add records in order, in one transaction: one commit (one fsync) for all.

        Raises:
            EventLogError: the file cannot be written; then none was added.
        """
        now_ms = time.time_ns() // 1_000_000
        rows = []
        for topic, key, value, headers in records:
            check_record(key, value)
            rows.append((topic, key, value, _encode_headers(headers), now_ms))
        if rows:
            self._db.run(lambda conn: conn.executemany(_APPEND, rows), write=True)

    def consumer(self, group: str, topic: str) -> LogConsumer:
        """A consumer of ``topic`` for ``group``, starting at the group's committed offset."""
        consumer = _SqliteConsumer(self._db.path, group, topic, self._poll_interval_s)
        self._consumers.add(consumer)
        return consumer

    def consumer_of(self, group: str, topics: Sequence[str]) -> MultiTopicConsumer:
        """One consumer of all of ``topics`` for ``group``, each at the group's committed
        offset; a waiting poll wakes on a write to any of them."""
        if not topics or len(set(topics)) != len(topics):
            raise ValueError(f"topics must be distinct and at least one, not {list(topics)}")
        consumer = _SqliteMultiConsumer(self._db.path, group, topics, self._poll_interval_s)
        self._consumers.add(consumer)
        return consumer

    def member_of(
        self, group: str, topics: Sequence[str], rebalance: Rebalance | None = None
    ) -> GroupMember:
        """The one member of ``group``: every topic's partition 0 is its own until
        it closes, and ``rebalance`` is told so at its first poll.

        One member per group: a SQLite file is one machine's log, and sharing a
        group's records between processes would need what Kafka's group
        coordinator does. A lock file beside the log (``LOG.GROUP.lock``, an
        ``flock`` that dies with its process) says who holds it.

        Raises:
            GroupBusyError: another process is the group's member.
        """
        if not topics or len(set(topics)) != len(topics):
            raise ValueError(f"topics must be distinct and at least one, not {list(topics)}")
        lock = _GroupLock(self._db.path, group)
        try:
            member = _SqliteMember(
                self._db.path, group, topics, self._poll_interval_s, lock, rebalance
            )
        except BaseException:
            lock.release()
            raise
        self._consumers.add(member)
        return member

    def read_key(
        self, topic: str, key: bytes, since_ms: int, limit: int = 100_000
    ) -> list[LogRecord]:
        """The records of ``topic`` with ``key`` appended at ``since_ms`` or later
        (a scan of the topic's records: for reading back a request's reports)."""
        rows = self._db.run(
            lambda conn: conn.execute(_BY_KEY, (topic, since_ms, key, limit)).fetchall()
        )
        return [
            LogRecord(topic, 0, off, k, bytes(value), _decode_headers(headers), ts)
            for off, k, value, headers, ts in rows
        ]

    def assume_topics(self, topics: Iterable[str]) -> None:
        """Nothing to do: every SQLite topic exists once written to."""

    def waker(self) -> FileWatch | None:
        """A descriptor readable after any process wrote to the file (the caller
        closes it); None where the kernel cannot tell (poll instead)."""
        return watch(self._db.path)

    def describe(self) -> str:
        return f"sqlite:{self._db.path}"

    def check(self) -> None:
        """Open the file now and read all of it (``PRAGMA quick_check``), so that a
        damaged log stops a command at its start rather than mid-run.

        About 10 ms for a 10 MB log in the page cache, a few hundred from a cold disk.

        Raises:
            EventLogFileError: the file is not a Mayfly event log, or is corrupt.
        """
        self._db.run(lambda conn: _check_file(conn, self._db.path))

    def close(self) -> None:
        """Close this log and the consumers it made (in this process)."""
        for consumer in list(self._consumers):
            consumer.close()
        self._db.close()

    def __enter__(self) -> SqliteEventLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _SqliteConsumer:
    """One group's reader of one topic, with its own position and connection."""

    def __init__(self, path: Path, group: str, topic: str, poll_interval_s: float) -> None:
        # Its own connection: PRAGMA data_version, which a waiting poll watches, only
        # moves for commits made by *other* connections, the log's appends included.
        self._db = _Db(path)
        self._group, self._topic = group, topic
        self._poll_interval_s = poll_interval_s
        self._watch: FileWatch | None = None
        self._watched = False
        self._position = self.committed().get(0, 0)

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Up to ``max_records`` records after those already returned; wait up to ``timeout_s``."""
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {max_records}")
        deadline = time.monotonic() + timeout_s
        while True:
            # Version first: a commit landing after the SELECT's snapshot then shows as a change.
            version, rows = self._db.run(lambda conn: self._fetch(conn, max_records))
            if rows:
                self._position = rows[-1][0] + 1
                return [
                    LogRecord(self._topic, 0, off, key, value, _decode_headers(headers), ts_ms)
                    for off, key, value, headers, ts_ms in rows
                ]
            if time.monotonic() >= deadline or not _wait_for_commit(
                self._db, self._watcher(), version, deadline, self._poll_interval_s
            ):
                return []

    def _watcher(self) -> FileWatch | None:
        # Made on the first waiting poll (most consumers never wait), and drained
        # before each fetch by its wait: a write after the fetch stays pending.
        if not self._watched:
            self._watched = True
            self._watch = watch(self._db.path)
        return self._watch

    def _fetch(self, conn: sqlite3.Connection, limit: int) -> tuple[int, list[Any]]:
        version = _data_version(conn)
        return version, conn.execute(_FETCH, (self._topic, self._position, limit)).fetchall()

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Durably store ``{0: offset of the next record to read}`` for the group."""
        for partition, offset in offsets.items():
            if partition != 0 or offset < 0:
                raise EventLogError(
                    f"sqlite:{self._db.path}: cannot commit offset {offset} of partition "
                    f"{partition}: topic {self._topic} has one partition, 0, offsets from 0"
                )
        if 0 in offsets:
            params = (self._group, self._topic, offsets[0])
            self._db.run(lambda conn: conn.execute(_COMMIT, params), write=True)

    def committed(self) -> dict[int, int]:
        """``{0: next offset}`` as last committed by the group, ``{}`` if it never committed."""
        row = self._db.run(
            lambda conn: conn.execute(_COMMITTED, (self._group, self._topic)).fetchone()
        )
        return {} if row is None else {0: row[0]}

    def end_offsets(self) -> dict[int, int]:
        """``{0: the offset the next appended record will get}``."""
        end: int = self._db.run(lambda conn: conn.execute(_END, (self._topic,)).fetchone()[0])
        return {0: end}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self._db.close()


class _SqliteMultiConsumer:
    """One group's reader of several topics: a :class:`_SqliteConsumer` per topic
    (each its own position and commits), and one wait for a write to any of them."""

    def __init__(
        self, path: Path, group: str, topics: Sequence[str], poll_interval_s: float
    ) -> None:
        self._consumers = {t: _SqliteConsumer(path, group, t, poll_interval_s) for t in topics}
        self._db = _Db(path)  # its own connection, for data_version (see _SqliteConsumer)
        self._poll_interval_s = poll_interval_s
        self._paused: set[str] = set()
        self._first = 0  # the topic read first, turn by turn: none starves the others
        self._watch: FileWatch | None = None
        self._watched = False

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Up to ``max_records`` records of the topics not paused; wait up to ``timeout_s``."""
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {max_records}")
        deadline = time.monotonic() + timeout_s
        consumers = list(self._consumers.items())
        while True:
            # Version first: a commit after the reads below then shows as a change.
            version = self._db.run(_data_version)
            records: list[LogRecord] = []
            self._first = (self._first + 1) % len(consumers)
            for topic, consumer in consumers[self._first :] + consumers[: self._first]:
                if topic not in self._paused and len(records) < max_records:
                    records += consumer.poll(max_records - len(records), 0.0)
            if records:
                return records
            if time.monotonic() >= deadline:
                return []
            if not self._watched:  # made on the first waiting poll, as _SqliteConsumer's
                self._watched = True
                self._watch = watch(self._db.path)
            if not _wait_for_commit(
                self._db, self._watch, version, deadline, self._poll_interval_s
            ):
                return []

    def pause(self, topic: str) -> None:
        """Return nothing more of ``topic`` until :meth:`resume`."""
        self._of(topic)
        self._paused.add(topic)

    def resume(self, topic: str) -> None:
        self._of(topic)
        self._paused.discard(topic)

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Durably store, per topic, ``{0: offset of the next record to read}``."""
        for topic in offsets:
            self._of(topic)  # all refused before any is stored
        for topic, of_topic in offsets.items():
            self._consumers[topic].commit(of_topic)

    def committed(self) -> dict[str, dict[int, int]]:
        return {topic: consumer.committed() for topic, consumer in self._consumers.items()}

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        if self._watch is not None:
            self._watch.close()
        self._db.close()

    def _of(self, topic: str) -> _SqliteConsumer:
        if topic not in self._consumers:
            raise EventLogError(
                f"sqlite:{self._db.path}: this consumer reads {', '.join(self._consumers)}"
            )
        return self._consumers[topic]


class _SqliteMember(_SqliteMultiConsumer):
    """The one member of a group (see :meth:`SqliteEventLog.member_of`)."""

    shared = False

    def __init__(
        self,
        path: Path,
        group: str,
        topics: Sequence[str],
        poll_interval_s: float,
        lock: _GroupLock,
        rebalance: Rebalance | None,
    ) -> None:
        super().__init__(path, group, topics, poll_interval_s)
        self._lock, self._rebalance = lock, rebalance

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        if self._rebalance is not None:
            rebalance, self._rebalance = self._rebalance, None
            for topic, of_topic in self.committed().items():
                rebalance.assigned(topic, {0: Position(of_topic.get(0, 0))})
        return super().poll(max_records, timeout_s)

    def commit_positions(self, positions: Mapping[str, Mapping[int, Position]]) -> None:
        """Store the offsets: with one member per group, nobody takes a partition
        over mid-way, and the runtime keeps its own note of what is done."""
        self.commit({t: {p: pos.offset for p, pos in of.items()} for t, of in positions.items()})

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._lock.release()


class _GroupLock:
    """An exclusive ``flock`` on ``LOG.GROUP.lock``, holding the holder's pid."""

    def __init__(self, log: Path, group: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in group)[:100]
        self.path = log.with_name(f"{log.name}.{safe}.lock")
        _prepare_file(log)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EventLogError(f"sqlite:{log}: cannot open {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._holder()
            self.release()
            who = f"process {pid}" if pid else "another process"
            raise GroupBusyError(
                f"sqlite:{log}: group {group!r} is already served by {who} (another "
                "`mayfly up` on this log?); an embedded log has one runtime at a "
                "time: stop that one, or give this one its own MAYFLY_EVENT_LOG, or "
                "run several on Kafka",
                pid=pid,
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def _holder(self) -> int | None:
        assert self._fd is not None
        raw = os.pread(self._fd, 32, 0).strip()
        return int(raw) if raw.isdigit() else None

    def release(self) -> None:
        # Closing the descriptor drops the flock. A child forked meanwhile would share
        # it: the runtime forks its warm parent before it joins a group, for that.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _wait_for_commit(
    db: _Db, watch: FileWatch | None, version: int, deadline: float, poll_interval_s: float
) -> bool:
    """Wait until another connection committed to the file since ``version`` of
    ``PRAGMA data_version`` (True), or until ``deadline`` (False).

    Sleeps on ``watch`` where there is one, checking the file anyway every
    ``_WATCHED_RECHECK_S``; for ``WRITE_SETTLE_S`` after a wake (the write may not
    be visible yet), and without a watch, it asks every ``poll_interval_s``.
    """
    written = -math.inf
    while (remaining := deadline - time.monotonic()) > 0:
        if watch is None or time.monotonic() - written < WRITE_SETTLE_S:
            time.sleep(min(poll_interval_s, remaining))
        elif watch.wait(min(_WATCHED_RECHECK_S, remaining)):
            written = time.monotonic()
        if db.run(_data_version) != version:
            return True
    return False


def _data_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA data_version").fetchone()[0]
    return version


# -- The file is Mayfly's: marked, checked, refused untouched when it is not ----------

#: ``PRAGMA application_id`` of a Mayfly event log ("MFEL" in ASCII): set when Mayfly
#: creates the file, checked whenever it opens one.
APPLICATION_ID = 0x4D46454C
_OWNERS = {0x4D465253: "Mayfly's runtime state"}  # "MFRS": mayfly.runtime.state's mark
_TABLES = frozenset({"records", "commits"})
_CANNOT_WRITE = frozenset({sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM})
_ELSEWHERE = "point MAYFLY_EVENT_LOG (--event-log) at another file"


def _prepare_file(path: Path) -> None:
    """Create the file's folder.

    The file itself is only ever opened by SQLite: closing any other descriptor on it
    would drop every POSIX lock this process holds there, its connections' included.
    A file that is not SQLite is found by the first read (``SQLITE_NOTADB``).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise EventLogFileError(
            path, f"cannot create its folder {path.parent}: {why}; {_ELSEWHERE}"
        ) from exc


def _claim_file(conn: sqlite3.Connection, path: Path) -> None:
    """Make the file a Mayfly event log: create the schema in a new file, adopt and
    mark one from before the mark, refuse anything else without writing to it.

    Raises:
        EventLogFileError: another application's file, or a schema this Mayfly
            does not read.
        sqlite3.Error: a busy file (to retry), or one that cannot be read.
    """
    # Looked at first without the write lock, which a read-only foreign file would
    # refuse, but in one snapshot: another process may be creating the file right now.
    conn.execute("BEGIN")
    try:
        needed = _needs_mark(conn, path)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    if not needed:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _needs_mark(conn, path):
            if not _names(conn):
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID:d}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _needs_mark(conn: sqlite3.Connection, path: Path) -> bool:
    """False for a marked Mayfly event log, True for a new or an unmarked one
    (from before the mark: exactly Mayfly's tables); refuses any other file."""
    app_id: int = conn.execute("PRAGMA application_id").fetchone()[0]
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if (app_id, version) == (APPLICATION_ID, SCHEMA_VERSION):
        return False  # the common case: two reads of the header
    names = _names(conn)
    if app_id not in (0, APPLICATION_ID):
        owner = _OWNERS.get(app_id, f"a SQLite database with application_id {app_id:#x}")
        raise EventLogFileError(
            path, f"not a Mayfly event log: {owner}, left untouched; {_ELSEWHERE}"
        )
    if app_id == 0 and names and names != _TABLES:
        shown = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
        raise EventLogFileError(
            path,
            f"not a Mayfly event log: another application's SQLite database (tables: "
            f"{shown}), left untouched; {_ELSEWHERE}",
        )
    # Before the mark, Mayfly set user_version to SCHEMA_VERSION with the tables.
    if version != SCHEMA_VERSION and not (version == 0 and not names):
        raise EventLogFileError(
            path,
            f"schema version {version}, this Mayfly reads {SCHEMA_VERSION}: "
            "use the Mayfly that wrote it or a new file",
        )
    return True


def _names(conn: sqlite3.Connection) -> frozenset[str]:
    """Every table, index, view and trigger of the file but SQLite's own."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'")
    return frozenset(name for (name,) in rows)


def _check_file(conn: sqlite3.Connection, path: Path) -> None:
    """Read the whole file (``PRAGMA quick_check``); a damaged one is refused."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EventLogFileError(path, _corrupt(f"{problems[0]}{more}", path))


def _file_error(exc: sqlite3.Error, path: Path) -> EventLogFileError | None:
    """What a SQLite error means, if it means the file cannot be used: it is
    corrupt, not a database, or cannot be opened or written."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_NOTADB:
        return EventLogFileError(
            path, f"not a Mayfly event log: not a SQLite database; {_ELSEWHERE}"
        )
    if code == sqlite3.SQLITE_CORRUPT:
        return EventLogFileError(path, _corrupt(str(exc), path))
    if code in _CANNOT_WRITE:
        return EventLogFileError(path, f"cannot open it for writing ({exc}); {_ELSEWHERE}")
    return None


def _corrupt(problem: str, path: Path) -> str:
    return (
        f"corrupt: {problem}; stop Mayfly and salvage what it holds with "
        f"`sqlite3 {path} .recover`, or move it aside (with its -wal and -shm files) "
        "to start a new log"
    )
