"""Where a coordinator delivers its result: stdout, a file, an HTTP sink, or an event log.

Every sink returns from :meth:`ResultSink.emit` only once the event is durable
(fsynced, acknowledged with 2xx, or appended to the event log: on Kafka,
acknowledged by all in-sync replicas), because the coordinator exits right
after and a request whose result was lost would look as if it never ran.

Which sink a target string names (``MAYFLY_RESULT_SINK``, or ``K_SINK`` from a
Knative SinkBinding) is decided by the composition root,
:func:`mayfly.app.wiring.open_sink`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from mayfly.errors import MayflyError, SinkError
from mayfly.eventlog import EventLog, Headers
from mayfly.events import (
    MayflyEvent,
    RejectionCode,
    TaskCancel,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    split_completed,
    to_http,
    to_kafka_record,
)
from mayfly.topics import Topics

__all__ = [
    "EventLogSink",
    "FileSink",
    "HttpSink",
    "ResultSink",
    "deliver",
    "outcome_records",
]

_LOG = logging.getLogger("mayfly.coordinator")


class ResultSink(Protocol):
    def emit(self, event: MayflyEvent) -> None:
        """Deliver one event; return only once it is durable."""
        ...

    def close(self) -> None: ...


def deliver(sink: ResultSink, outcome: TaskCompleted | TaskRejected) -> int:
    """Emit a result (split into parts under Kafka's size limit) or a rejection.

    Returns:
        How many events were emitted.
    """
    events: tuple[MayflyEvent, ...] = (
        split_completed(outcome) if isinstance(outcome, TaskCompleted) else (outcome,)
    )
    for event in events:
        sink.emit(event)
    return len(events)


class FileSink:
    """Structured-mode CloudEvents, one JSON object per line."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def emit(self, event: MayflyEvent) -> None:
        _, body = to_http(event, "structured")
        line = body + b"\n"
        if self.path is None:
            try:
                sys.stdout.buffer.write(line)
                sys.stdout.buffer.flush()
            except (OSError, ValueError) as exc:  # a closed pipe, or a closed stdout
                raise SinkError(f"cannot write to stdout: {exc}") from exc
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            why = exc.strerror or str(exc)
            if isinstance(exc, FileExistsError | NotADirectoryError):
                why = f"a file is in the way of its folder {self.path.parent}"
            raise SinkError(f"cannot append to {self.path}: {why}") from exc

    def close(self) -> None:
        pass


class HttpSink:
    """POSTs binary-mode CloudEvents, retrying connection errors and 5xx."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 5,
        timeout_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self._attempts = attempts
        self._timeout = timeout_s
        self._sleep = sleep
        # Here, not at the top: `mayfly up` imports this module for the runtime's
        # own sink, and requests is 17 MB of a process that never posts a result.
        import requests

        self._errors = requests.RequestException
        self._session = requests.Session()

    def emit(self, event: MayflyEvent) -> None:
        if isinstance(event, TaskCancel):
            # A URL per lane has no control topic, and nothing there reads one.
            _LOG.warning("%s: a cancel cannot go out over HTTP; not sent", event.request_id)
            return
        headers, body = to_http(event, "binary")
        # One URL per lane for the shards of a request: `.../requests-{priority}`.
        url = self.url.replace("{priority}", str(getattr(event, "priority", "")))
        self.post(url, headers, body)

    def post(self, url: str, headers: dict[str, str], body: bytes) -> None:
        """POST one binary-mode message as it is; return once the sink took it.

        Raises:
            SinkError: it refused it, or could not be reached, after the retries.
        """
        problem = ""
        for attempt in range(self._attempts):
            try:
                response = self._session.post(
                    url, data=body, headers=headers, timeout=self._timeout
                )
            except self._errors as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500 and response.status_code != 429:
                    break
            if attempt + 1 < self._attempts:  # no wait after the last one
                self._sleep(min(0.2 * 2**attempt, 3.0))
        raise SinkError(f"sink {url} refused the event: {problem}")

    def close(self) -> None:
        self._session.close()


def outcome_records(
    event: MayflyEvent, results_topic: str, dead_letter_topic: str, lanes: Topics | None = None
) -> list[tuple[str, bytes | None, bytes, Headers]]:
    """The records an outcome is appended as: binary mode, keyed by partition key,
    on the results topic, a rejection on the dead-letter topic too (but for a
    cancel before the start: nothing went wrong), and a
    request (a shard) on the lane of its priority among ``lanes``."""
    key, value, headers = to_kafka_record(event)
    if isinstance(event, TaskRequest):
        if lanes is None:
            raise SinkError(f"request {event.id} has no lane here: this sink takes results only")
        return [(lanes.lane(event.priority), key, value, headers)]
    if isinstance(event, TaskCancel):  # a shard's abort, to its siblings
        if lanes is None:
            raise SinkError(f"cancel {event.id} has no control topic here")
        return [(lanes.control, key, value, headers)]
    records: list[tuple[str, bytes | None, bytes, Headers]] = [(results_topic, key, value, headers)]
    if isinstance(event, TaskRejected) and event.code is not RejectionCode.CANCELED:
        records.append((dead_letter_topic, key, value, headers))
    return records


class EventLogSink:
    """Appends binary-mode records keyed by partition key; a rejection also goes to
    the dead-letter topic, a request (a shard) to its lane.

    Over Kafka this is the event log's one idempotent producer per process
    (``mayfly.eventlog.kafka``), so a result and the requests share its
    durability and fork handling.
    """

    def __init__(
        self,
        log: EventLog,
        topics: Topics | None = None,
        *,
        results: str | None = None,
        owns_log: bool = False,
    ) -> None:
        topics = topics or Topics()
        self.log = log
        self._owns_log = owns_log
        self.results_topic = results or topics.results
        self.dead_letter_topic = topics.dead_letter
        self.topics = topics

    def emit(self, event: MayflyEvent) -> None:
        records = outcome_records(event, self.results_topic, self.dead_letter_topic, self.topics)
        try:
            self.log.append_many(records)
        except MayflyError as exc:
            raise SinkError(
                f"{self.log.describe()} did not take {event.event_type}: {exc}"
            ) from exc

    def close(self) -> None:
        if self._owns_log:
            self.log.close()
