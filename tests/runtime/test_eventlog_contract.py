"""One contract, every event log: the embedded SQLite log (and, later, real Kafka).

The contract tests use fresh uuid topic and group names, so they can share one
broker; the SQLite-only tests at the end check what only a file shared by many
processes can break: concurrent writers, a writer killed mid-append, a fork.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from mayfly.errors import EventLogError
from mayfly.runtime.eventlog import EventLog, LogConsumer, LogRecord
from mayfly.runtime.sqlitelog import SCHEMA_VERSION, SqliteEventLog

# How long to keep polling before deciding that nothing more will come: long
# enough for a real broker's fetch round trip, short enough to keep the suite fast.
QUIET_S = 0.2
WAIT_S = 10.0

_fork = multiprocessing.get_context("fork")


@pytest.fixture(params=["sqlite"])
def event_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    # A Kafka implementation joins with one more param (marked pytest.mark.kafka) and branch.
    log = SqliteEventLog(tmp_path / "log" / "events.db", poll_interval_s=0.001)
    yield log
    log.close()


@pytest.fixture
def open_consumer(event_log: EventLog) -> Iterator[Callable[[str, str], LogConsumer]]:
    """Makes consumers of ``event_log`` and closes them all after the test."""
    made: list[LogConsumer] = []

    def make(group: str, topic: str) -> LogConsumer:
        made.append(event_log.consumer(group, topic))
        return made[-1]

    yield make
    for consumer in made:
        consumer.close()


def _name(kind: str) -> str:
    return f"test.{kind}.{uuid.uuid4().hex}"


@pytest.fixture
def topic() -> str:
    return _name("topic")


@pytest.fixture
def group() -> str:
    return _name("group")


def _drain(consumer: LogConsumer, count: int) -> list[LogRecord]:
    """Exactly ``count`` records, then nothing more within QUIET_S."""
    records: list[LogRecord] = []
    deadline = time.monotonic() + WAIT_S
    while len(records) < count and time.monotonic() < deadline:
        records += consumer.poll(count - len(records), 0.1)
    assert len(records) == count
    assert consumer.poll(100, QUIET_S) == []
    return records


def _fill(log: EventLog, topic: str, count: int) -> None:
    for i in range(count):
        log.append(topic, f"k{i}".encode(), f"v{i}".encode())


# --- the contract ------------------------------------------------------------


def test_records_come_back_in_order_with_dense_offsets(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 5)
    records = _drain(open_consumer(group, topic), 5)
    assert [(r.topic, r.partition, r.offset) for r in records] == [(topic, 0, i) for i in range(5)]
    assert [(r.key, r.value) for r in records] == [
        (f"k{i}".encode(), f"v{i}".encode()) for i in range(5)
    ]
    assert all(r.timestamp_ms > 0 for r in records)


def test_key_headers_and_value_round_trip(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    headers = [("ce_id", b"1"), ("ce_type", b"dev.mayfly.task.requested"), ("ce_id", b"dup")]
    headers += [("bin\u00e9", bytes(range(256))), ("empty", b"")]
    event_log.append(topic, b"device-1", b'{"a": 1}', headers)
    event_log.append(topic, None, b"", ())
    event_log.append(topic, b"", b"\x00\xff")
    first, second, third = _drain(open_consumer(group, topic), 3)
    assert (first.key, first.value, first.headers) == (b"device-1", b'{"a": 1}', tuple(headers))
    assert (second.key, second.value, second.headers) == (None, b"", ())
    assert (third.key, third.value) == (b"", b"\x00\xff")


def test_a_consumer_returns_each_record_once(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 5)
    consumer = open_consumer(group, topic)
    seen: list[int] = []
    deadline = time.monotonic() + WAIT_S
    while len(seen) < 5 and time.monotonic() < deadline:
        batch = consumer.poll(2, 0.1)
        assert len(batch) <= 2
        seen += [r.offset for r in batch]
    assert seen == [0, 1, 2, 3, 4]
    assert consumer.poll(100, QUIET_S) == []
    event_log.append(topic, None, b"late")
    assert [(r.offset, r.value) for r in _drain(consumer, 1)] == [(5, b"late")]


def test_a_new_consumer_of_the_group_resumes_after_the_commit(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 5)
    first = open_consumer(group, topic)
    assert first.committed() == {}
    _drain(first, 5)
    first.commit({0: 3})
    assert first.committed() == {0: 3}
    second = open_consumer(group, topic)
    assert second.committed() == {0: 3}
    assert [r.offset for r in _drain(second, 2)] == [3, 4]


def test_another_group_starts_at_zero(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 3)
    consumer = open_consumer(group, topic)
    _drain(consumer, 3)
    consumer.commit({0: 3})
    other = open_consumer(_name("group"), topic)
    assert other.committed() == {}
    assert [r.offset for r in _drain(other, 3)] == [0, 1, 2]


def test_records_after_the_last_commit_are_delivered_again(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 4)
    crashed = open_consumer(group, topic)
    _drain(crashed, 4)
    crashed.commit({0: 1})  # handled record 0, then died before committing the rest
    crashed.close()
    again = open_consumer(group, topic)
    assert [(r.offset, r.value) for r in _drain(again, 3)] == [(1, b"v1"), (2, b"v2"), (3, b"v3")]


def test_poll_returns_as_soon_as_a_record_arrives(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    consumer = open_consumer(group, topic)
    assert consumer.poll(10, QUIET_S) == []
    writer = threading.Timer(0.2, event_log.append, (topic, None, b"wake"))
    started = time.monotonic()
    writer.start()
    try:
        records = consumer.poll(10, 4 * WAIT_S)
    finally:
        writer.join()
    assert [r.value for r in records] == [b"wake"]
    assert time.monotonic() - started < WAIT_S  # woken by the record, not by the timeout


def test_end_offsets(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    consumer = open_consumer(group, topic)
    assert consumer.end_offsets() == {0: 0}
    _fill(event_log, topic, 3)
    assert consumer.end_offsets() == {0: 3}
    assert consumer.committed() == {}  # appending commits nothing for any group


def test_topics_are_independent(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], group: str
) -> None:
    a, b = _name("topic"), _name("topic")
    for i in range(3):
        event_log.append(a, None, f"a{i}".encode())
        event_log.append(b, None, f"b{i}".encode())
    event_log.append(b, None, b"b3")
    consumer_a, consumer_b = open_consumer(group, a), open_consumer(group, b)
    assert [(r.topic, r.offset, r.value) for r in _drain(consumer_a, 3)] == [
        (a, i, f"a{i}".encode()) for i in range(3)
    ]
    consumer_a.commit({0: 3})
    assert consumer_b.committed() == {}
    assert [(r.offset, r.value) for r in _drain(consumer_b, 4)] == [
        (i, f"b{i}".encode()) for i in range(4)
    ]
    assert consumer_b.end_offsets() == {0: 4}


# --- SQLite only ---------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


def _all_records(path: Path, topic: str) -> list[LogRecord]:
    with SqliteEventLog(path) as log:
        consumer = log.consumer(_name("group"), topic)
        records: list[LogRecord] = []
        while batch := consumer.poll(10_000):
            records += batch
        return records


def _payload(i: int) -> bytes:
    # Several KiB per record, so a kill often lands while WAL frames are half written.
    return hashlib.sha256(str(i).encode()).digest() * 128


def _append_many(path: Path, topic: str, writer: int, count: int, barrier: Barrier) -> None:
    with SqliteEventLog(path) as log:
        barrier.wait()
        for i in range(count):
            log.append(topic, f"{writer}:{i}".encode(), _payload(i))


def test_concurrent_processes_append_without_loss(db_path: Path) -> None:
    topic, writers, count = _name("topic"), 4, 150
    barrier = _fork.Barrier(writers)
    procs = [
        _fork.Process(target=_append_many, args=(db_path, topic, w, count, barrier))
        for w in range(writers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(WAIT_S)
    assert [proc.exitcode for proc in procs] == [0] * writers
    records = _all_records(db_path, topic)
    assert [r.offset for r in records] == list(range(writers * count))
    keys = [r.key.decode().split(":") for r in records if r.key is not None]
    assert sorted((int(w), int(i)) for w, i in keys) == [
        (w, i) for w in range(writers) for i in range(count)
    ]
    for w in range(writers):  # each writer's records in the order it appended them
        assert [int(i) for ww, i in keys if int(ww) == w] == list(range(count))


def _append_forever(path: Path, topic: str) -> None:
    with SqliteEventLog(path) as log:
        i = 0
        while True:
            log.append(topic, str(i).encode(), _payload(i), [("i", str(i).encode())])
            i += 1


def test_a_writer_killed_mid_append_leaves_every_record_intact(db_path: Path) -> None:
    topic = _name("topic")
    with SqliteEventLog(db_path) as log:
        log.append(topic, b"0", _payload(0), [("i", b"0")])
        proc = _fork.Process(target=_append_forever, args=(db_path, topic))
        proc.start()
        watcher = log.consumer(_name("group"), topic)
        deadline = time.monotonic() + WAIT_S
        while watcher.end_offsets()[0] < 300 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(WAIT_S)
        assert proc.exitcode == -signal.SIGKILL

        records = _all_records(db_path, topic)
        assert len(records) >= 300
        # Record 0 came from this process; the child numbered its own records from 0.
        assert [r.offset for r in records] == list(range(len(records)))
        for record in records[1:]:
            i = int(record.key or b"")
            assert (record.value, record.headers) == (_payload(i), (("i", str(i).encode()),))

        log.append(topic, b"after", b"the kill")
        assert watcher.end_offsets() == {0: len(records) + 1}
    with sqlite3.connect(db_path) as raw:
        check = raw.execute("PRAGMA integrity_check").fetchall()
    raw.close()  # the context manager only commits
    assert check == [("ok",)]


def _use_inherited(log: SqliteEventLog, consumer: LogConsumer, topic: str) -> None:
    log.append(topic, None, b"child")
    assert [r.value for r in consumer.poll(10)] == [b"child"]
    consumer.commit({0: 2})
    log.close()
    gc.collect()  # would close the inherited handles if nothing kept them referenced


def test_a_forked_child_uses_the_log_it_inherited(db_path: Path) -> None:
    topic, group = _name("topic"), _name("group")
    with SqliteEventLog(db_path) as log:
        log.append(topic, None, b"parent")
        consumer = log.consumer(group, topic)
        assert [r.value for r in consumer.poll(10)] == [b"parent"]
        child = _fork.Process(target=_use_inherited, args=(log, consumer, topic))
        child.start()
        child.join(WAIT_S)
        assert child.exitcode == 0
        log.append(topic, None, b"parent again")
        assert [r.value for r in consumer.poll(10)] == [b"child", b"parent again"]
        assert consumer.committed() == {0: 2}
    assert [r.value for r in _all_records(db_path, topic)] == [b"parent", b"child", b"parent again"]


def test_the_file_and_its_folder_are_created_with_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "events.db"
    with SqliteEventLog(path) as log:
        assert log.describe() == f"sqlite:{path}"
        log.append("t", None, b"x")
    with sqlite3.connect(path) as raw:
        modes = (
            raw.execute("PRAGMA journal_mode").fetchone(),
            raw.execute("PRAGMA user_version").fetchone(),
        )
    raw.close()
    assert modes == (("wal",), (SCHEMA_VERSION,))


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    with sqlite3.connect(db_path) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    raw.close()
    with SqliteEventLog(db_path) as log, pytest.raises(EventLogError, match="schema version"):
        log.append("t", None, b"x")


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"not sqlite at all" * 100)
    with SqliteEventLog(db_path) as log, pytest.raises(EventLogError, match=str(db_path)):
        log.append("t", None, b"x")


def test_misuse_is_refused(db_path: Path) -> None:
    log = SqliteEventLog(db_path)
    consumer = log.consumer("g", "t")
    with pytest.raises(EventLogError, match="one partition"):
        consumer.commit({1: 0})
    with pytest.raises(TypeError, match="header"):
        log.append("t", None, b"x", [("h", "not bytes")])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="value"):
        log.append("t", None, "text")  # type: ignore[arg-type]
    assert consumer.end_offsets() == {0: 0}
    log.close()
    with pytest.raises(EventLogError, match="after close"):
        log.append("t", None, b"x")
    with pytest.raises(EventLogError, match="after close"):
        consumer.poll()
