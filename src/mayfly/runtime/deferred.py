"""Requests their schedule holds, where no runtime holds them: on Knative.

The local runtime holds a deferred request's record uncommitted in its lane.
A Knative coordinator function cannot: its delivery ends with its answer. So
it writes the request, marked with when it may start (the ``notbefore``
extension attribute), to the installation's ``deferred`` topic (through its
KafkaSink) and acknowledges the delivery. A waker function, woken every
minute by a PingSource, makes one pass over that topic: each request due is
appended to its lane again (without the mark), each one not due is appended
to the deferred topic again, behind the pass, and the pass commits where it
ended. State in a topic, time from Knative's own PingSource: nothing
persistent runs.

A pass that dies before its commit is made again by the next ping: a request
may then reach its lane twice, which the devices' idempotency keys make
harmless, as for any redelivery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from mayfly.eventlog import EventLog, Headers, LogRecord
from mayfly.events import Priority
from mayfly.topics import Topics

__all__ = ["NOT_BEFORE_HEADER", "WakeReport", "not_before_of", "release_due"]

#: The Kafka header of the ``notbefore`` extension attribute (binary mode):
#: the RFC 3339 time a deferred request may start from.
NOT_BEFORE_HEADER = "ce_notbefore"
#: Records one pass moves at most; the next ping goes on from there.
MAX_PASS_RECORDS = 20_000
#: How long one pass reads at most (a PingSource fires every minute).
PASS_BUDGET_S = 30.0

_LOG = logging.getLogger("mayfly.runtime.deferred")


@dataclass(frozen=True)
class WakeReport:
    """What one pass did: requests back on their lane, still held."""

    released: int
    held: int


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
    log: EventLog, topics: Topics, now: datetime | None = None, *, group: str | None = None
) -> WakeReport:
    """One pass over the deferred topic: what is due back to its lane, the
    rest behind the pass; committed once appended."""
    now = now or datetime.now(UTC)
    consumer = log.consumer(group or f"{topics.prefix}-waker", topics.deferred)
    try:
        ends = consumer.end_offsets()
        committed = consumer.committed()
        left = {p: end for p, end in ends.items() if end > committed.get(p, 0)}
        reached: dict[int, int] = {}
        batch: list[tuple[str, bytes | None, bytes, Headers]] = []
        released = held = 0
        budget_at = time.monotonic() + PASS_BUDGET_S
        while left and released + held < MAX_PASS_RECORDS and time.monotonic() < budget_at:
            for record in consumer.poll(500, timeout_s=1.0):
                if record.offset >= ends.get(record.partition, 0):
                    left.pop(record.partition, None)  # past this pass: the next one's
                    continue
                is_due, out = _move(record, topics, now)
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
    return WakeReport(released, held)


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
