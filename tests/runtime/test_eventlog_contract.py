"""One contract, every event log: the embedded SQLite log and real Kafka.

The contract tests use fresh uuid topic and group names, so they can share one
broker. Kafka spreads keys over several partitions, so each test appends under
one key (one partition, whichever it is) or compares partition by partition.
The SQLite-only tests check what only a file shared by many processes can
break: concurrent writers, a writer killed mid-append, a fork; the Kafka-only
ones, forked producers and a broker that stops answering for a while.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from mayfly.errors import EventLogError, GroupBusyError
from mayfly.eventlog import EventLog, LogConsumer, LogRecord, MultiTopicConsumer, Position
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.eventlog.sqlite import SCHEMA_VERSION, SqliteEventLog

# How long to keep polling before deciding that nothing more will come: long
# enough for a real broker's fetch round trip, short enough to keep the suite fast.
QUIET_S = 0.2
WAIT_S = 10.0
KAFKA_PARTITIONS = 3
KEY = b"device-1"
REPO = Path(__file__).resolve().parents[2]

_fork = multiprocessing.get_context("fork")


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def event_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    log: EventLog
    if request.param == "kafka":
        log = KafkaEventLog(request.getfixturevalue("kafka_bootstrap"), partitions=KAFKA_PARTITIONS)
    else:
        log = SqliteEventLog(tmp_path / "log" / "events.db", poll_interval_s=0.001)
    yield log
    log.close()


@pytest.fixture
def partitions(event_log: EventLog) -> list[int]:
    """The partitions every topic of ``event_log`` has."""
    return list(range(KAFKA_PARTITIONS)) if isinstance(event_log, KafkaEventLog) else [0]


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


@pytest.fixture
def open_multi(
    event_log: EventLog,
) -> Iterator[Callable[[str, list[str]], MultiTopicConsumer]]:
    """Makes multi-topic consumers of ``event_log`` and closes them all after the test."""
    made: list[MultiTopicConsumer] = []

    def make(group: str, topics: list[str]) -> MultiTopicConsumer:
        made.append(event_log.consumer_of(group, topics))
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


def _drain(consumer: LogConsumer | MultiTopicConsumer, count: int) -> list[LogRecord]:
    """Exactly ``count`` records, then nothing more within QUIET_S."""
    records: list[LogRecord] = []
    deadline = time.monotonic() + WAIT_S
    while len(records) < count and time.monotonic() < deadline:
        records += consumer.poll(count - len(records), 0.1)
    assert len(records) == count
    assert consumer.poll(100, QUIET_S) == []
    return records


def _fill(log: EventLog, topic: str, count: int, key: bytes = KEY) -> None:
    """``count`` records under one key: they all go to one partition, in this order."""
    for i in range(count):
        log.append(topic, key, f"v{i}".encode())


def _woken(
    consumer: LogConsumer | MultiTopicConsumer, write: Callable[[], None]
) -> list[LogRecord]:
    """What a long waiting poll returns when ``write`` appends 0.2 s into it;
    it must be woken by the record, not by its timeout."""
    assert consumer.poll(10, QUIET_S) == []
    writer = threading.Timer(0.2, write)
    started = time.monotonic()
    writer.start()
    try:
        records = consumer.poll(10, 4 * WAIT_S)
    finally:
        writer.join()
    assert time.monotonic() - started < WAIT_S
    return records


def _only_partition(records: list[LogRecord]) -> int:
    partitions = {r.partition for r in records}
    assert len(partitions) == 1, f"one key, several partitions: {partitions}"
    return partitions.pop()


# --- the contract ------------------------------------------------------------


def test_records_come_back_in_order_with_dense_offsets(
    event_log: EventLog,
    open_consumer: Callable[[str, str], LogConsumer],
    topic: str,
    group: str,
    partitions: list[int],
) -> None:
    _fill(event_log, topic, 5)
    consumer = open_consumer(group, topic)
    records = _drain(consumer, 5)
    p = _only_partition(records)
    assert [(r.topic, r.offset, r.key, r.value) for r in records] == [
        (topic, i, KEY, f"v{i}".encode()) for i in range(5)
    ]
    assert all(r.timestamp_ms > 0 for r in records)
    assert consumer.end_offsets() == {q: 5 if q == p else 0 for q in partitions}


def test_each_partition_keeps_append_order_and_each_key_one_partition(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    keys = [f"device-{k}".encode() for k in range(6)]
    for i in range(30):
        event_log.append(topic, keys[i % 6], str(i).encode())
    consumer = open_consumer(group, topic)
    records = _drain(consumer, 30)
    by_partition: dict[int, list[LogRecord]] = collections.defaultdict(list)
    for record in records:
        by_partition[record.partition].append(record)
    for in_partition in by_partition.values():
        assert [r.offset for r in in_partition] == list(range(len(in_partition)))
        values = [int(r.value) for r in in_partition]
        assert values == sorted(values)
    for k, key in enumerate(keys):
        of_key = [r for r in records if r.key == key]
        _only_partition(of_key)
        assert [int(r.value) for r in of_key] == list(range(k, 30, 6))
    ends = consumer.end_offsets()
    assert {p: n for p, n in ends.items() if n} == {p: len(r) for p, r in by_partition.items()}


def test_key_headers_and_value_round_trip(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    headers = [("ce_id", b"1"), ("ce_type", b"dev.mayfly.task.requested"), ("ce_id", b"dup")]
    headers += [("bin\u00e9", bytes(range(256))), ("empty", b"")]
    event_log.append(topic, b"device-1", b'{"a": 1}', headers)
    event_log.append(topic, None, b"", ())
    event_log.append(topic, b"", b"\x00\xff")
    # Three keys may land on three partitions: match records by value, not by order.
    by_value = {r.value: r for r in _drain(open_consumer(group, topic), 3)}
    first, second, third = by_value[b'{"a": 1}'], by_value[b""], by_value[b"\x00\xff"]
    assert (first.key, first.headers) == (b"device-1", tuple(headers))
    assert (second.key, second.headers) == (None, ())
    assert (third.key, third.headers) == (b"", ())


def test_a_consumer_returns_each_record_once(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 5)
    consumer = open_consumer(group, topic)
    seen: list[LogRecord] = []
    deadline = time.monotonic() + WAIT_S
    while len(seen) < 5 and time.monotonic() < deadline:
        batch = consumer.poll(2, 0.1)
        assert len(batch) <= 2
        seen += batch
    p = _only_partition(seen)
    assert [r.offset for r in seen] == [0, 1, 2, 3, 4]
    assert consumer.poll(100, QUIET_S) == []
    event_log.append(topic, KEY, b"late")
    assert [(r.partition, r.offset, r.value) for r in _drain(consumer, 1)] == [(p, 5, b"late")]


def test_a_new_consumer_of_the_group_resumes_after_the_commit(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 5)
    first = open_consumer(group, topic)
    assert first.committed() == {}
    p = _only_partition(_drain(first, 5))
    first.commit({p: 3})
    assert first.committed() == {p: 3}
    second = open_consumer(group, topic)
    assert second.committed() == {p: 3}
    assert [(r.partition, r.offset) for r in _drain(second, 2)] == [(p, 3), (p, 4)]


def test_another_group_starts_at_zero(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 3)
    consumer = open_consumer(group, topic)
    p = _only_partition(_drain(consumer, 3))
    consumer.commit({p: 3})
    other = open_consumer(_name("group"), topic)
    assert other.committed() == {}
    assert [(r.partition, r.offset) for r in _drain(other, 3)] == [(p, 0), (p, 1), (p, 2)]


def test_records_after_the_last_commit_are_delivered_again(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    _fill(event_log, topic, 4)
    crashed = open_consumer(group, topic)
    p = _only_partition(_drain(crashed, 4))
    crashed.commit({p: 1})  # handled record 0, then died before committing the rest
    crashed.close()
    again = open_consumer(group, topic)
    assert [(r.partition, r.offset, r.value) for r in _drain(again, 3)] == [
        (p, 1, b"v1"),
        (p, 2, b"v2"),
        (p, 3, b"v3"),
    ]


def test_poll_returns_as_soon_as_a_record_arrives(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    records = _woken(open_consumer(group, topic), lambda: event_log.append(topic, None, b"wake"))
    assert [r.value for r in records] == [b"wake"]


def test_end_offsets(
    event_log: EventLog,
    open_consumer: Callable[[str, str], LogConsumer],
    topic: str,
    group: str,
    partitions: list[int],
) -> None:
    consumer = open_consumer(group, topic)
    assert consumer.end_offsets() == dict.fromkeys(partitions, 0)
    _fill(event_log, topic, 3)
    ends = consumer.end_offsets()
    assert sorted(ends) == partitions
    assert sorted(ends.values()) == [0] * (len(partitions) - 1) + [3]
    assert consumer.committed() == {}  # appending commits nothing for any group


def test_topics_are_independent(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], group: str
) -> None:
    a, b = _name("topic"), _name("topic")
    for i in range(3):
        event_log.append(a, KEY, f"a{i}".encode())
        event_log.append(b, KEY, f"b{i}".encode())
    event_log.append(b, KEY, b"b3")
    consumer_a, consumer_b = open_consumer(group, a), open_consumer(group, b)
    records_a = _drain(consumer_a, 3)
    assert [(r.topic, r.offset, r.value) for r in records_a] == [
        (a, i, f"a{i}".encode()) for i in range(3)
    ]
    consumer_a.commit({_only_partition(records_a): 3})
    assert consumer_b.committed() == {}
    records_b = _drain(consumer_b, 4)
    assert [(r.offset, r.value) for r in records_b] == [(i, f"b{i}".encode()) for i in range(4)]
    ends = consumer_b.end_offsets()
    assert {p: n for p, n in ends.items() if n} == {_only_partition(records_b): 4}


def test_append_many_adds_every_record_in_order_across_topics(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], group: str
) -> None:
    a, b = _name("topic"), _name("topic")
    event_log.append(a, KEY, b"first")
    event_log.append_many(
        [(a, KEY, b"a1", [("h", b"1")]), (b, KEY, b"b0", ()), (a, KEY, b"a2", ())]
    )
    event_log.append_many([])
    records_a = _drain(open_consumer(group, a), 3)
    assert [(r.offset, r.value) for r in records_a] == [(0, b"first"), (1, b"a1"), (2, b"a2")]
    assert records_a[1].headers == (("h", b"1"),)
    assert [r.value for r in _drain(open_consumer(group, b), 1)] == [b"b0"]


def test_read_key_returns_one_keys_records_since_a_time_in_order(
    event_log: EventLog, topic: str
) -> None:
    event_log.append(topic, b"other", b"not this key")
    event_log.append_many([(topic, KEY, b"old", ())])
    time.sleep(0.05)
    since_ms = time.time_ns() // 1_000_000
    time.sleep(0.01)
    for i in range(30):  # more keys beside, over the partitions
        event_log.append_many(
            [(topic, KEY, f"v{i}".encode(), [("n", b"%d" % i)]), (topic, b"k%d" % i, b"x", ())]
        )
    records = event_log.read_key(topic, KEY, since_ms)
    assert [r.value for r in records] == [f"v{i}".encode() for i in range(30)]
    assert records[3].headers == (("n", b"3"),)
    assert all(r.key == KEY and r.timestamp_ms >= since_ms for r in records)
    assert [r.value for r in event_log.read_key(topic, KEY, 0, limit=2)] == [b"old", b"v0"]
    assert event_log.read_key(topic, b"no such key", 0) == []
    assert event_log.read_key(topic, KEY, since_ms + 3_600_000) == []


def test_append_many_refuses_a_bad_record_before_adding_any(
    event_log: EventLog, open_consumer: Callable[[str, str], LogConsumer], topic: str, group: str
) -> None:
    with pytest.raises(TypeError):
        event_log.append_many([(topic, KEY, b"ok", ()), (topic, KEY, "text", ())])  # type: ignore[list-item]
    event_log.append(topic, KEY, b"after")
    assert [r.value for r in _drain(open_consumer(group, topic), 1)] == [b"after"]


# --- one consumer of several topics ----------------------------------------------

MultiFactory = Callable[[str, list[str]], MultiTopicConsumer]


def _by_topic(records: list[LogRecord]) -> dict[str, list[tuple[int, bytes]]]:
    found: dict[str, list[tuple[int, bytes]]] = collections.defaultdict(list)
    for record in records:
        found[record.topic].append((record.offset, record.value))
    return dict(found)


def test_a_multi_topic_consumer_reads_each_topic_in_order_under_its_name(
    event_log: EventLog, open_multi: MultiFactory, group: str
) -> None:
    a, b, c = _name("topic"), _name("topic"), _name("topic")
    for i in range(3):
        event_log.append(a, KEY, f"a{i}".encode())
        event_log.append(b, KEY, f"b{i}".encode())
    consumer = open_multi(group, [a, b, c])
    assert consumer.committed() == {a: {}, b: {}, c: {}}
    records = _drain(consumer, 6)
    assert _by_topic(records) == {
        a: [(i, f"a{i}".encode()) for i in range(3)],
        b: [(i, f"b{i}".encode()) for i in range(3)],
    }
    event_log.append(c, KEY, b"c0")
    assert [(r.topic, r.offset, r.value) for r in _drain(consumer, 1)] == [(c, 0, b"c0")]


def test_a_multi_topic_consumer_commits_per_topic_as_a_single_one_would(
    event_log: EventLog,
    open_multi: MultiFactory,
    open_consumer: Callable[[str, str], LogConsumer],
    group: str,
) -> None:
    a, b = _name("topic"), _name("topic")
    _fill(event_log, a, 4)
    _fill(event_log, b, 2)
    first = open_multi(group, [a, b])
    records = _drain(first, 6)
    pa = _only_partition([r for r in records if r.topic == a])
    pb = _only_partition([r for r in records if r.topic == b])
    first.commit({a: {pa: 1}})
    first.commit({a: {pa: 3}, b: {pb: 2}})
    assert first.committed() == {a: {pa: 3}, b: {pb: 2}}
    # The same offsets a single-topic consumer of the group reads, and writes.
    assert open_consumer(group, a).committed() == {pa: 3}
    open_consumer(group, b).commit({pb: 1})
    first.close()
    # After a crash: what was not committed, of each topic, comes again.
    again = open_multi(group, [a, b])
    assert again.committed() == {a: {pa: 3}, b: {pb: 1}}
    assert _by_topic(_drain(again, 2)) == {a: [(3, b"v3")], b: [(1, b"v1")]}
    assert open_multi(_name("group"), [b]).committed() == {b: {}}


def test_a_paused_topic_is_held_back_and_nothing_of_it_is_lost(
    event_log: EventLog, open_multi: MultiFactory, group: str
) -> None:
    a, b = _name("topic"), _name("topic")
    _fill(event_log, a, 3)
    consumer = open_multi(group, [a, b])
    assert [r.offset for r in _drain(consumer, 3)] == [0, 1, 2]
    consumer.pause(a)
    _fill(event_log, a, 2)
    event_log.append(b, KEY, b"b0")
    assert _by_topic(_drain(consumer, 1)) == {b: [(0, b"b0")]}  # and nothing of a
    consumer.resume(a)
    assert _by_topic(_drain(consumer, 2)) == {a: [(3, b"v0"), (4, b"v1")]}


@pytest.mark.parametrize("shape", ["consumer_of", "member_of"])
def test_pausing_mid_batch_loses_nothing(event_log: EventLog, group: str, shape: str) -> None:
    # A dispatcher's pattern: small polls, the topic paused while records it
    # fetched are not all returned, resumed later, again and again.
    a, b = _name("topic"), _name("topic")
    event_log.append_many([(a, str(n).encode(), b"v", ()) for n in range(300)])
    open_reader = event_log.consumer_of if shape == "consumer_of" else event_log.member_of
    consumer = open_reader(group, [a, b])
    got: set[tuple[int, int]] = set()
    paused, held = False, 0
    deadline = time.monotonic() + 30
    try:
        while len(got) < 300 and time.monotonic() < deadline:
            if (held >= 48) != paused:
                paused = not paused
                (consumer.pause if paused else consumer.resume)(a)
            for record in consumer.poll(16 if paused else 64 - held, 0.01):
                got.add((record.partition, record.offset))
                held += 1
            held = max(0, held - 3)
    finally:
        consumer.close()
    assert len(got) == 300, f"{300 - len(got)} records never returned"


def test_a_member_alone_in_its_group_reads_every_partition_and_hears_of_them(
    event_log: EventLog, group: str, partitions: list[int]
) -> None:
    a = _name("topic")
    told: dict[str, dict[int, Position]] = {}

    class Told:
        def assigned(self, topic: str, positions: Mapping[int, Position]) -> None:
            told.setdefault(topic, {}).update(positions)

        def revoking(self, topic: str, parts: Collection[int]) -> None: ...

        def drain(self, wait_s: float) -> bool:
            return True

        def positions(self) -> Mapping[str, Mapping[int, Position]]:
            return {}

        def lost(self, topic: str, parts: Collection[int]) -> None: ...

    _fill(event_log, a, 6)
    member = event_log.member_of(group, [a], Told())
    try:
        records = _drain(member, 6)
        assert sorted(told[a]) == partitions
        assert all(position.offset == 0 for position in told[a].values())
        last = max(records, key=lambda r: r.offset)
        member.commit_positions({a: {last.partition: Position(last.offset + 1)}})
    finally:
        member.close()
    again = event_log.member_of(group, [a], Told())
    try:
        again.poll(1, 0.5)
        assert told[a][last.partition].offset == last.offset + 1
    finally:
        again.close()


def test_a_waiting_multi_topic_poll_returns_on_a_record_of_any_topic(
    event_log: EventLog, open_multi: MultiFactory, group: str
) -> None:
    a, b = _name("topic"), _name("topic")
    records = _woken(open_multi(group, [a, b]), lambda: event_log.append(b, None, b"wake"))
    assert [(r.topic, r.value) for r in records] == [(b, b"wake")]


def test_a_multi_topic_consumer_refuses_what_it_does_not_read(
    event_log: EventLog, open_multi: MultiFactory, group: str, partitions: list[int]
) -> None:
    a = _name("topic")
    consumer = open_multi(group, [a])
    with pytest.raises(EventLogError, match="reads"):
        consumer.pause(_name("topic"))
    with pytest.raises(EventLogError):
        consumer.commit({_name("topic"): {0: 1}})
    with pytest.raises(EventLogError, match="partition"):
        consumer.commit({a: {len(partitions): 0}})
    assert consumer.committed() == {a: {}}
    with pytest.raises(ValueError, match="distinct"):
        event_log.consumer_of(group, [a, a])


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


def test_a_second_member_of_a_group_on_the_embedded_log_is_refused_naming_the_first(
    db_path: Path,
) -> None:
    log = SqliteEventLog(db_path)
    first = log.member_of("runtime", ["t"])
    try:
        with pytest.raises(GroupBusyError, match=f"process {os.getpid()}") as refused:
            SqliteEventLog(db_path).member_of("runtime", ["t"])
        assert refused.value.pid == os.getpid()
        log.member_of("another-group", ["t"]).close()  # groups are independent
    finally:
        first.close()
    log.member_of("runtime", ["t"]).close()  # free once the first closed
    log.close()


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


# --- Kafka only ------------------------------------------------------------------


@pytest.fixture
def kafka_log(kafka_bootstrap: str) -> Iterator[KafkaEventLog]:
    log = KafkaEventLog(kafka_bootstrap, partitions=KAFKA_PARTITIONS)
    yield log
    log.close()


@pytest.mark.kafka
def test_kafka_spreads_keys_over_the_partitions(
    kafka_log: KafkaEventLog, topic: str, group: str
) -> None:
    for i in range(30):
        kafka_log.append(topic, f"device-{i}".encode(), b"x")
    consumer = kafka_log.consumer(group, topic)
    try:
        records = _drain(consumer, 30)
        assert {r.partition for r in records} == set(range(KAFKA_PARTITIONS))
        consumer.commit({0: 1, 1: 1, 2: 1})
        assert consumer.committed() == {0: 1, 1: 1, 2: 1}
        with pytest.raises(EventLogError, match="has partitions"):
            consumer.commit({KAFKA_PARTITIONS: 0})
    finally:
        consumer.close()
    with pytest.raises(EventLogError, match="after close"):
        consumer.poll()


@pytest.mark.kafka
def test_kafka_creates_every_topic_of_an_installation_on_first_use(
    kafka_log: KafkaEventLog, group: str
) -> None:
    prefix = _name("install")
    consumer = kafka_log.consumer(group, f"{prefix}.requests.high")
    consumer.close()
    admin = kafka_log._client("admin")
    expected = {f"{prefix}.requests.{lane}" for lane in ("high", "normal", "low")}
    expected |= {f"{prefix}.results", f"{prefix}.deadletter"}
    described = admin.describe_topics(sorted(expected))
    assert {t["name"]: len(t["partitions"]) for t in described} == dict.fromkeys(
        expected, KAFKA_PARTITIONS
    )


def _append_in_child(log: KafkaEventLog, topic: str, count: int) -> None:
    for i in range(count):
        log.append(topic, KEY, f"child{i}".encode())
    log.close()  # closes the child's own clients only; the parent's stay usable


@pytest.mark.kafka
def test_kafka_records_appended_by_a_forked_child_reach_the_parent(
    kafka_log: KafkaEventLog, topic: str, group: str
) -> None:
    kafka_log.append(topic, KEY, b"parent")  # the parent's producer exists before the fork
    consumer = kafka_log.consumer(group, topic)
    try:
        assert [r.value for r in _drain(consumer, 1)] == [b"parent"]
        for count in (0, 3):  # a child that only closes the log, then one that appends
            child = _fork.Process(target=_append_in_child, args=(kafka_log, topic, count))
            child.start()
            child.join(WAIT_S * 3)
            assert child.exitcode == 0
        kafka_log.append(topic, KEY, b"parent again")
        assert [(r.offset, r.value) for r in _drain(consumer, 4)] == [
            (1, b"child0"),
            (2, b"child1"),
            (3, b"child2"),
            (4, b"parent again"),
        ]
    finally:
        consumer.close()


def _broker_pid() -> int:
    found = subprocess.run(
        [sys.executable, str(REPO / "dev" / "services"), "pid", "kafka"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0 or not found.stdout.strip().isdigit():
        message = f"the Kafka broker was not started by dev/services: {found.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: integration tests must not skip)", pytrace=False)
        pytest.skip(message)
    return int(found.stdout.strip())


@pytest.mark.kafka
def test_kafka_appends_polls_and_commits_ride_out_a_paused_broker(
    kafka_log: KafkaEventLog, kafka_bootstrap: str, topic: str, group: str
) -> None:
    pid = _broker_pid()
    consumer = kafka_log.consumer(group, topic)
    kafka_log.append(topic, KEY, b"before")
    assert [r.value for r in _drain(consumer, 1)] == [b"before"]
    acked: list[float] = []

    def append_during_pause() -> None:
        for i in range(10):
            kafka_log.append(topic, KEY, f"during{i}".encode())
            acked.append(time.monotonic())

    appender = threading.Thread(target=append_during_pause)
    threads = threading.active_count() + 1
    os.kill(pid, signal.SIGSTOP)
    try:
        appender.start()
        deadline = time.monotonic() + 3.0
        # A new client cannot start (the broker accepts connections but never answers):
        # an EventLogError, and no I/O thread left behind.
        new = KafkaEventLog(kafka_bootstrap, connect_timeout_s=1)
        with new, pytest.raises(EventLogError, match="no broker answered"):
            new.append(topic, KEY, b"never")
        assert threading.active_count() == threads
        while time.monotonic() < deadline:  # polls come back empty, they do not fail
            assert consumer.poll(10, 0.2) == []
        assert acked == []  # nothing is acknowledged by a stopped broker
        resumed = time.monotonic()
    finally:
        os.kill(pid, signal.SIGCONT)
    appender.join(WAIT_S * 3)
    assert len(acked) == 10
    assert min(acked) >= resumed
    records = _drain(consumer, 10)
    p = _only_partition(records)
    assert [(r.offset, r.value) for r in records] == [
        (i + 1, f"during{i}".encode()) for i in range(10)
    ]
    resume = threading.Timer(1.0, os.kill, (pid, signal.SIGCONT))
    os.kill(pid, signal.SIGSTOP)
    try:
        resume.start()
        consumer.commit({p: 11})  # waits for the broker rather than failing
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT)
        consumer.close()
    # Closed here: a consumer left to the garbage collector leaves its socket
    # open until the session ends, and pytest reports it there.
    check = kafka_log.consumer(group, topic)
    try:
        assert check.committed() == {p: 11}
    finally:
        check.close()


def test_an_unreachable_kafka_is_an_event_log_error_naming_it() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bootstrap = f"127.0.0.1:{port}"
    with KafkaEventLog(bootstrap, connect_timeout_s=0.5) as log:
        assert log.describe() == f"kafka://{bootstrap}"
        with pytest.raises(EventLogError, match=f"kafka://{bootstrap}"):
            log.append("t", None, b"x")
        with pytest.raises(TypeError, match="value"):
            log.append("t", None, "text")  # type: ignore[arg-type]
