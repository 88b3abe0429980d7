"""The local runtime: embedded event log, dispatcher, warm-parent spawner."""

from __future__ import annotations

from mayfly.runtime.eventlog import (
    DEAD_LETTER_TOPIC,
    REQUEST_TOPICS,
    RESULTS_TOPIC,
    EventLog,
    LogConsumer,
    LogRecord,
    request_topic,
)

__all__ = [
    "DEAD_LETTER_TOPIC",
    "REQUEST_TOPICS",
    "RESULTS_TOPIC",
    "EventLog",
    "LogConsumer",
    "LogRecord",
    "request_topic",
]
