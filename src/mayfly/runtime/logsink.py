"""A result sink that appends to the event log: results topic, and dead letters."""

from __future__ import annotations

from mayfly.events import MayflyEvent, TaskRejected, to_kafka_record
from mayfly.runtime.eventlog import DEFAULT_TOPICS, EventLog, Topics

__all__ = ["EventLogSink"]


class EventLogSink:
    """Appends binary-mode records; a rejection also goes to the dead-letter topic."""

    def __init__(self, log: EventLog, topics: Topics = DEFAULT_TOPICS) -> None:
        self.log = log
        self.topics = topics

    def emit(self, event: MayflyEvent) -> None:
        key, value, headers = to_kafka_record(event)
        self.log.append(self.topics.results, key, value, headers)
        if isinstance(event, TaskRejected):
            self.log.append(self.topics.dead_letter, key, value, headers)

    def close(self) -> None:
        pass
