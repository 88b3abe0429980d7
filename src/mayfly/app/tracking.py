"""Reading the request view from the log: ``mayfly get``, ``list`` and ``watch``.

The lanes, the results and the control topic are read from their beginning
to where they ended when the read started (``watch``: the results topic on, as it grows),
by consumers of a group of their own that commit nothing, so a read changes
nothing any runtime sees. Lanes first: a shard's rejection is then traced
back to its request by the shards seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from mayfly.errors import EventError
from mayfly.eventlog import EventLog, LogRecord
from mayfly.events import from_kafka
from mayfly.topics import Topics
from mayfly.tracking import RequestBook, RequestView

__all__ = ["follow", "read_book"]

#: A read stops after this long without a record, even short of the end it
#: saw: an offset no record will fill (a Kafka transaction marker) ends it.
_IDLE_S = 2.0
_BATCH = 2000


def read_book(
    log: EventLog,
    topics: Topics,
    only: Iterable[str] | None = None,
    *,
    keep_devices: bool = True,
) -> RequestBook:
    """The request view of every request in the log (or ``only`` those)."""
    book = RequestBook(only, keep_devices=keep_devices)
    group = f"mayfly-view-{uuid.uuid4().hex[:12]}"
    for topic in [*topics.lanes(), topics.results, topics.control]:
        _read_topic(log, group, topic, book)
    return book


def follow(
    log: EventLog,
    topics: Topics,
    request_id: str,
    on_change: Callable[[RequestView], None],
    timeout_s: float,
) -> RequestView | None:
    """Follow one request until its outcome is read or ``timeout_s`` passes.

    ``on_change`` is told of the view once the log is read to where it ended
    at the start, and again at every change after that.

    Returns:
        The view as it last stood; None when the log had no such request
        once read to where it ended at the start.
    """
    book = RequestBook([request_id])
    group = f"mayfly-watch-{uuid.uuid4().hex[:12]}"
    for lane in topics.lanes():
        _read_topic(log, group, lane, book)
    deadline = time.monotonic() + timeout_s
    consumer = log.consumer(group, topics.results)
    try:
        left = {p: end for p, end in consumer.end_offsets().items() if end > 0}
        idle_since = time.monotonic()
        caught_up = False
        while time.monotonic() < deadline:
            if not caught_up and (not left or time.monotonic() - idle_since >= _IDLE_S):
                caught_up = True
                view = book.get(request_id)
                if view is None:
                    return None
                on_change(view)
                if view.outcome is not None:
                    return view
            records = consumer.poll(_BATCH, max(0.0, min(0.5, deadline - time.monotonic())))
            if records:
                idle_since = time.monotonic()
            for record in records:
                end = left.get(record.partition)
                if end is not None and record.offset + 1 >= end:
                    del left[record.partition]
                changed = _fold(record, book)
                if changed is not None and caught_up:
                    on_change(changed)
                    if changed.outcome is not None:
                        return changed
    finally:
        consumer.close()
    return book.get(request_id)


def _fold(record: LogRecord, book: RequestBook) -> RequestView | None:
    try:
        event = from_kafka(record.headers, record.key, record.value)
    except EventError:
        return None  # a broken record: the aggregator dead-letters it
    return book.add(event)


def _read_topic(log: EventLog, group: str, topic: str, book: RequestBook) -> None:
    consumer = log.consumer(group, topic)
    try:
        left = {p: end for p, end in consumer.end_offsets().items() if end > 0}
        idle_since = time.monotonic()
        while left and time.monotonic() - idle_since < _IDLE_S:
            records = consumer.poll(_BATCH, 0.2)
            if records:
                idle_since = time.monotonic()
            for record in records:
                end = left.get(record.partition)
                if end is None:
                    continue  # appended after the read started, or a partition done
                if record.offset + 1 >= end:
                    del left[record.partition]
                if record.offset < end:
                    _fold(record, book)
    finally:
        consumer.close()
