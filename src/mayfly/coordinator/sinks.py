"""Where a coordinator delivers its result: a file, an HTTP sink, or Kafka.

Every sink returns from :meth:`ResultSink.emit` only once the event is durable
(fsynced, acknowledged with 2xx, or acknowledged by all in-sync Kafka
replicas), because the coordinator exits right after and a request whose
result was lost would look as if it never ran.

Targets, as one string (``MAYFLY_RESULT_SINK``, or ``K_SINK`` from a Knative
SinkBinding):

- ``-``: structured JSON lines on stdout;
- ``file:PATH`` or a plain path: structured JSON lines appended to PATH;
- ``http://...`` / ``https://...``: a binary-mode CloudEvent POST;
- ``kafka://HOST:PORT[,HOST:PORT]/TOPIC``: binary-mode record on TOPIC, and a
  rejection also on the dead-letter topic.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import requests

from mayfly.errors import ConfigError, SinkError
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    split_completed,
    to_http,
    to_kafka_record,
)

__all__ = [
    "DEAD_LETTER_TOPIC",
    "FileSink",
    "HttpSink",
    "KafkaSink",
    "ResultSink",
    "deliver",
    "open_sink",
]

DEAD_LETTER_TOPIC = "mayfly.deadletter"


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
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

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
        self._session = requests.Session()

    def emit(self, event: MayflyEvent) -> None:
        headers, body = to_http(event, "binary")
        problem = ""
        for attempt in range(self._attempts):
            try:
                response = self._session.post(
                    self.url, data=body, headers=headers, timeout=self._timeout
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500 and response.status_code != 429:
                    break
            self._sleep(min(0.2 * 2**attempt, 3.0))
        raise SinkError(f"result sink {self.url} refused the event: {problem}")

    def close(self) -> None:
        self._session.close()


class KafkaSink:
    """Produces binary-mode records keyed by partition key, acks from all replicas."""

    def __init__(
        self, bootstrap: str, topic: str, *, dead_letter_topic: str = DEAD_LETTER_TOPIC
    ) -> None:
        from kafka import KafkaProducer  # imported only when Kafka is the sink
        from kafka.errors import KafkaError

        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        try:
            self._producer: Any = KafkaProducer(
                bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=5
            )
        except KafkaError as exc:
            raise SinkError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
        self._errors: tuple[type[BaseException], ...] = (KafkaError,)

    def emit(self, event: MayflyEvent) -> None:
        key, value, headers = to_kafka_record(event)
        topics = [self.topic]
        if isinstance(event, TaskRejected):
            topics.append(self.dead_letter_topic)
        try:
            futures = [
                self._producer.send(t, key=key, value=value, headers=headers) for t in topics
            ]
            for future in futures:
                future.get(timeout=30)
        except self._errors as exc:
            raise SinkError(f"Kafka did not acknowledge {event.__class__.__name__}: {exc}") from exc

    def close(self) -> None:
        self._producer.close(timeout=10)


def open_sink(target: str) -> ResultSink:
    """The sink a target string names (see the module docstring)."""
    if target in ("", "-", "stdout"):
        return FileSink(None)
    if target.startswith(("http://", "https://")):
        return HttpSink(target)
    if target.startswith("kafka://"):
        rest = target.removeprefix("kafka://")
        bootstrap, _, topic = rest.partition("/")
        if not bootstrap or not topic:
            raise ConfigError(f"result sink {target!r}: expected kafka://HOST:PORT/TOPIC")
        return KafkaSink(bootstrap, topic)
    return FileSink(Path(target.removeprefix("file:")))
