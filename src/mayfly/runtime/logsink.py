"""A result sink that appends to the event log: results topic, and dead letters."""

from __future__ import annotations

from mayfly.events import MayflyEvent, TaskRejected, to_kafka_record
from mayfly.runtime.eventlog import DEAD_LETTER_TOPIC, RESULTS_TOPIC, EventLog

__all__ = ["EventLogSink"]


class EventLogSink:
    """Appends binary-mode records; a rejection also goes to the dead-letter topic."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def emit(self, event: MayflyEvent) -> None:
        key, value, headers = to_kafka_record(event)
        self.log.append(RESULTS_TOPIC, key, value, headers)
        if isinstance(event, TaskRejected):
            self.log.append(DEAD_LETTER_TOPIC, key, value, headers)

    def close(self) -> None:
        pass
