"""Reading the request view from the log: ``mayfly get`` and ``mayfly list``.

The lanes and the results topic are read from their beginning to where they
ended when the read started, by consumers of a group of their own that
commit nothing, so a read changes nothing any runtime sees. Lanes first: a
shard's rejection is then traced back to its request by the shards seen.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from mayfly.errors import EventError
from mayfly.eventlog import EventLog
from mayfly.events import from_kafka
from mayfly.topics import Topics
from mayfly.tracking import RequestBook

__all__ = ["read_book"]

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
    for topic in [*topics.lanes(), topics.results]:
        _read_topic(log, group, topic, book)
    return book


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
                if record.offset >= end:
                    continue
                try:
                    event = from_kafka(record.headers, record.key, record.value)
                except EventError:
                    continue  # a broken record: the aggregator dead-letters it
                book.add(event)
    finally:
        consumer.close()
