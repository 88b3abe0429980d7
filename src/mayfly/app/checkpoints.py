"""A paced rollout's checkpoints, read back from the log.

A coordinator of a paced rollout reports each device's end in its progress
events (``ended``). One that picks the request up after another died reads
those reports back here, from the results topic, keyed by the request: on
Kafka only the request's partition, from the offset of its publish time.
The log is opened for that read alone, and only for paced requests: a
rollout that takes minutes can spare it, the fast path never pays it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from mayfly.errors import EventError
from mayfly.events import TaskProgress, TaskRequest, from_kafka
from mayfly.settings import Settings

__all__ = ["LogCheckpoints"]

#: Reports are read from this long before the request's own time: the
#: publisher's clock and the log's may differ.
_CLOCK_MARGIN = timedelta(minutes=10)


class LogCheckpoints:
    """The :class:`~mayfly.coordinator.core.Checkpoints` of the configured log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def reports_of(self, request: TaskRequest) -> Iterator[TaskProgress]:
        from mayfly.app.wiring import open_event_log

        since = request.time - _CLOCK_MARGIN
        log = open_event_log(self.settings)
        try:
            records = log.read_key(
                self.settings.topics.results,
                request.root_id.encode(),
                int(since.timestamp() * 1000),
            )
        finally:
            log.close()
        for record in records:
            try:
                event = from_kafka(record.headers, record.key, record.value)
            except EventError:
                continue  # a broken record: the aggregator dead-letters it
            if isinstance(event, TaskProgress):
                yield event
