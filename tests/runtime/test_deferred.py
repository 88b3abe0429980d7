"""The waker's pass over the deferred topic (Knative's schedule holding), on
the embedded log and on real Kafka: due requests back on their lane, unmarked;
the rest held for a later pass; a pass again finds only what it left."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mayfly.eventlog import EventLog
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import from_kafka, new_request, to_kafka_record
from mayfly.runtime.deferred import NOT_BEFORE_HEADER, release_due, wake
from mayfly.topics import Topics


@pytest.fixture(params=["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def event_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventLog]:
    log: EventLog
    if request.param == "kafka":
        log = KafkaEventLog(request.getfixturevalue("kafka_bootstrap"), partitions=3)
    else:
        log = SqliteEventLog(tmp_path / "log" / "events.db", poll_interval_s=0.001)
    yield log
    log.close()


def _defer(log: EventLog, topics: Topics, priority: str, until: datetime | None, raw: bytes = b""):
    request = new_request("reboot", devices=["sim-0001"], priority=priority)
    key, value, headers = to_kafka_record(request)
    mark = raw or (until.isoformat().encode() if until else b"")
    marked = [*headers, (NOT_BEFORE_HEADER, mark)] if mark else list(headers)
    log.append(topics.deferred, key, value, marked)
    return request


def _ids(log: EventLog, topic: str) -> list[str]:
    consumer = log.consumer(f"reader-{uuid.uuid4().hex[:6]}", topic)
    try:
        total = sum(consumer.end_offsets().values())  # every record from the start
        found: list[str] = []
        deadline = time.monotonic() + 15
        while len(found) < total and time.monotonic() < deadline:
            for record in consumer.poll(100, timeout_s=0.5):
                assert NOT_BEFORE_HEADER not in dict(record.headers)
                found.append(from_kafka(record.headers, record.key, record.value).id)
        return found
    finally:
        consumer.close()


def test_a_pass_releases_what_is_due_and_holds_the_rest(event_log: EventLog) -> None:
    topics = Topics(f"defer-{uuid.uuid4().hex[:8]}")
    event_log.assume_topics(topics.all())
    now = datetime.now(UTC)
    due = _defer(event_log, topics, "high", now - timedelta(seconds=1))
    later = _defer(event_log, topics, "normal", now + timedelta(hours=1))
    unreadable = _defer(event_log, topics, "low", None, raw=b"next tuesday")

    first = release_due(event_log, topics, now)
    assert (first.released, first.held) == (2, 1)
    assert _ids(event_log, topics.lane("high")) == [due.id]
    assert _ids(event_log, topics.lane("low")) == [unreadable.id]  # judged again by a coordinator

    # The next pass sees only what the first held, and releases it once due.
    second = release_due(event_log, topics, now + timedelta(minutes=1))
    assert (second.released, second.held) == (0, 1)
    third = release_due(event_log, topics, now + timedelta(hours=2))
    assert (third.released, third.held) == (1, 0)
    assert _ids(event_log, topics.lane("normal")) == [later.id]
    assert release_due(event_log, topics, now + timedelta(hours=3)) == type(third)(0, 0)


def test_a_ping_waits_for_a_request_falling_due_before_the_next_one(event_log: EventLog) -> None:
    """A request due 2 s after the ping is released then, not at the next
    ping a minute later, and not before its time; one due in an hour is left
    for a later ping, which the report says when."""
    topics = Topics(f"defer-{uuid.uuid4().hex[:8]}")
    event_log.assume_topics(topics.all())
    now = datetime.now(UTC)
    soon = _defer(event_log, topics, "high", now + timedelta(seconds=2))
    hour = now + timedelta(hours=1)
    _defer(event_log, topics, "normal", hour)

    report = wake(event_log, topics, window_s=10)
    released_at = datetime.now(UTC)
    assert (report.released, report.held) == (1, 1)
    assert report.next_due == hour
    assert released_at >= now + timedelta(seconds=2)
    assert released_at < now + timedelta(seconds=8)
    assert _ids(event_log, topics.lane("high")) == [soon.id]


def test_a_ping_does_not_wait_past_its_window(event_log: EventLog) -> None:
    topics = Topics(f"defer-{uuid.uuid4().hex[:8]}")
    event_log.assume_topics(topics.all())
    due = datetime.now(UTC) + timedelta(seconds=5)
    _defer(event_log, topics, "high", due)
    started = time.monotonic()
    report = wake(event_log, topics, window_s=1)
    assert time.monotonic() - started < 4
    assert (report.released, report.held, report.next_due) == (0, 1, due)
