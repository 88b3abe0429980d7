"""Requests their schedule holds, where no runtime holds them: on Knative.

The local runtime holds a deferred request's record uncommitted in its lane.
A Knative coordinator function cannot: its delivery ends with its answer. So
it writes the request, marked with when it may start (the ``notbefore``
extension attribute), to the installation's ``deferred`` topic (through its
KafkaSink) and acknowledges the delivery. A waker function, woken every
minute by a PingSource, makes a pass over that topic: each request due is
appended to its lane again (without the mark), each one not due is appended
to the deferred topic again, behind the pass, and the pass commits where it
ended. When a held request falls due before the next ping could release it,
the waker waits for that moment and passes again (:func:`wake`), a few
times a ping at most: a request starts within about a second of its time,
not up to a minute late. State in a topic, time from Knative's own
PingSource: nothing persistent runs.

A pass that dies before its commit is made again by the next ping: a request
may then reach its lane twice, which the devices' idempotency keys make
harmless, as for any redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from mayfly.eventlog import EventLog, Headers, LogRecord
from mayfly.events import Priority
from mayfly.topics import Topics

__all__ = ["NOT_BEFORE_HEADER", "WakeReport", "not_before_of", "release_due", "wake"]

#: The Kafka header of the ``notbefore`` extension attribute (binary mode):
#: the RFC 3339 time a deferred request may start from.
NOT_BEFORE_HEADER = "ce_notbefore"
#: Records one pass moves at most; the next ping goes on from there.
MAX_PASS_RECORDS = 20_000
#: How long one pass reads at most (a PingSource fires every minute).
PASS_BUDGET_S = 30.0
#: How long after its ping the waker may still wait for a held request to fall
#: due and pass again: the rest of the minute, less a pass's reading budget
#: would be too little, so the last timed pass gets what is left of this.
WAKE_WINDOW_S = 50.0
#: Passes one ping makes at most: every pass appends each held request again.
MAX_PASSES = 4

_LOG = logging.getLogger("mayfly.runtime.deferred")


@dataclass(frozen=True)
class WakeReport:
    """What one pass (or a ping's passes) did: requests back on their lane,
    still held, and when the first of those held falls due."""

    released: int
    held: int
    next_due: datetime | None = None


def not_before_of(headers: Headers) -> datetime | None:
    """When a deferred record may start; None when it says nothing readable
    (it is released: the coordinator judges the request again)."""
    for name, value in headers:
        if name == NOT_BEFORE_HEADER:
            try:
                when = datetime.fromisoformat(bytes(value[:64]).decode())
            except (ValueError, UnicodeDecodeError):
                return None
            return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return None


def _lane_of(headers: Headers, topics: Topics) -> str:
    for name, value in headers:
        if name == "ce_priority":
            try:
                return topics.lane(Priority(bytes(value[:16]).decode()))
            except (ValueError, UnicodeDecodeError):
                break
    return topics.lane(Priority.NORMAL)


def release_due(
    log: EventLog,
    topics: Topics,
    now: datetime | None = None,
    *,
    group: str | None = None,
    budget_s: float = PASS_BUDGET_S,
) -> WakeReport:
    """One pass over the deferred topic: what is due back to its lane, the
    rest behind the pass; committed once appended. It reads for ``budget_s``
    at most; the next pass goes on from where it stopped."""
    now = now or datetime.now(UTC)
    next_due: datetime | None = None
    consumer = log.consumer(group or f"{topics.prefix}-waker", topics.deferred)
    try:
        ends = consumer.end_offsets()
        committed = consumer.committed()
        left = {p: end for p, end in ends.items() if end > committed.get(p, 0)}
        reached: dict[int, int] = {}
        batch: list[tuple[str, bytes | None, bytes, Headers]] = []
        released = held = 0
        budget_at = time.monotonic() + budget_s
        while left and released + held < MAX_PASS_RECORDS and time.monotonic() < budget_at:
            for record in consumer.poll(500, timeout_s=1.0):
                if record.offset >= ends.get(record.partition, 0):
                    left.pop(record.partition, None)  # past this pass: the next one's
                    continue
                is_due, out = _move(record, topics, now)
                if not is_due:
                    when = not_before_of(out[3])
                    if when is not None and (next_due is None or when < next_due):
                        next_due = when
                batch.append(out)
                released, held = released + is_due, held + (not is_due)
                reached[record.partition] = record.offset + 1
                if record.offset + 1 >= ends[record.partition]:
                    left.pop(record.partition, None)
        if batch:
            log.append_many(batch)
        if reached:
            consumer.commit(reached)
    finally:
        consumer.close()
    if released or held:
        _LOG.info("deferred requests: %d back on their lanes, %d still held", released, held)
    return WakeReport(released, held, next_due)


def wake(
    log: EventLog,
    topics: Topics,
    *,
    window_s: float = WAKE_WINDOW_S,
    max_passes: int = MAX_PASSES,
    sleep: Callable[[float], None] = time.sleep,
) -> WakeReport:
    """A ping's passes: one now, then, while a held request falls due within
    ``window_s`` of the ping, one at that moment (``max_passes`` in all)."""
    started = time.monotonic()
    report = release_due(log, topics)
    released, passes = report.released, 1
    while report.next_due is not None and passes < max_passes:
        wait = (report.next_due - datetime.now(UTC)).total_seconds()
        left = window_s - (time.monotonic() - started)
        if wait > left:
            break  # the next ping's
        sleep(max(0.0, wait))
        report = release_due(log, topics, budget_s=min(PASS_BUDGET_S, max(1.0, left - wait)))
        released, passes = released + report.released, passes + 1
    return WakeReport(released, report.held, report.next_due)


def _move(
    record: LogRecord, topics: Topics, now: datetime
) -> tuple[bool, tuple[str, bytes | None, bytes, Headers]]:
    """Where one deferred record goes: its lane (unmarked) once due, else the
    deferred topic again."""
    headers = tuple(record.headers)
    when = not_before_of(headers)
    if when is not None and when > now:
        return False, (topics.deferred, record.key, record.value, headers)
    unmarked = tuple((n, v) for n, v in headers if n != NOT_BEFORE_HEADER)
    return True, (_lane_of(headers, topics), record.key, record.value, unmarked)
