"""What a coordinator with no runtime keeps in the installation's log.

In ``mayfly up`` the runtime hands each coordinator the cancels of its request
and takes its progress events. Job mode and the Knative functions have no
runtime beside them; when ``MAYFLY_EVENT_LOG`` names the installation's Kafka
they do the same through it:

- they watch the control topic for a cancel of their request (``mayfly
  cancel``, or a sibling shard's abort), polled every couple of seconds by a
  thread, read by the request's key from its publish time;
- they send progress events to the results topic, with the checkpoints of a
  paced or scheduled rollout in them, and read those checkpoints back when
  they pick up a request another instance left unfinished;
- a shard that aborts publishes the cancel that stops its siblings there.

Without a Kafka log none of this happens: a request runs as it did, heard of
only by its outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from datetime import timedelta

from mayfly.app.checkpoints import LogCheckpoints
from mayfly.coordinator import Coordinator, RequestPipeline
from mayfly.coordinator.progress import ProgressReporter
from mayfly.coordinator.sinks import EventLogSink, ResultSink
from mayfly.errors import EventError, MayflyError
from mayfly.eventlog import EventLog
from mayfly.events import TaskCancel, TaskRequest, from_kafka
from mayfly.settings import Settings

__all__ = [
    "CONTROL_EVERY_S",
    "InstallationLog",
    "LogControl",
    "installation_log",
    "standalone_pipeline",
]

_LOG = logging.getLogger("mayfly.coordinator.control")
#: How often a running request's cancels are looked for: one keyed read of the
#: control topic (about 13 ms of CPU and 150 ms of wall time on Kafka here).
CONTROL_EVERY_S = 2.0
#: Cancels are read from this long before the request's own time: the
#: publisher's clock and the log's may differ.
_CLOCK_MARGIN = timedelta(minutes=10)


class LogControl:
    """A run's :class:`~mayfly.coordinator.runner.RunControl` read from the
    control topic: the first cancel of the request (of the whole request when
    it is a shard). A thread looks at once, then every ``every_s`` until it
    finds one or :meth:`close` (or the ``with`` block ends); the run hears of
    it through a pipe."""

    def __init__(
        self, log: EventLog, topic: str, request: TaskRequest, *, every_s: float = CONTROL_EVERY_S
    ) -> None:
        self._log, self._topic, self._every_s = log, topic, every_s
        self._key = request.root_id.encode()
        self._ids = frozenset({request.root_id, request.id})
        self._since_ms = int((request.time - _CLOCK_MARGIN).timestamp() * 1000)
        self._request_id = request.id
        self._grace: float | None = None
        self._abort: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._thread = threading.Thread(
            target=self._watch, name=f"mayfly-control-{request.id[:24]}", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> LogControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int | None:
        # Once a cancel is heard there is no more news (the pipe is at its end).
        with self._lock:
            heard = self._grace is not None
        return self._read_fd if self._read_fd >= 0 and not heard else None

    def read(self) -> None:
        with contextlib.suppress(OSError):  # empty (BlockingIOError), or closed
            while os.read(self._read_fd, 64):
                pass

    def canceled(self) -> float | None:
        with self._lock:
            return self._grace

    def aborted(self) -> str | None:
        with self._lock:
            return self._abort

    def close(self) -> None:
        """Stop looking (the run ended). Not waited for: a look under way (150
        ms on Kafka, more with a broker down) would hold up the result; the
        thread closes its end of the pipe itself as it stops."""
        self._stop.set()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def _watch(self) -> None:
        try:
            self._watch_until_heard()
        finally:
            os.close(self._write_fd)

    def _watch_until_heard(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                cancel = self._look()
            except MayflyError as exc:
                if not failing:  # said once, not every couple of seconds
                    _LOG.warning("%s: cancels not read: %s", self._request_id, exc)
                failing = True
            else:
                failing = False
                if cancel is not None:
                    self._heard(cancel)
                    return
            self._stop.wait(self._every_s)

    def _look(self) -> TaskCancel | None:
        for record in self._log.read_key(self._topic, self._key, self._since_ms):
            try:
                event = from_kafka(record.headers, record.key, record.value)
            except EventError:
                continue  # a broken record: not a cancel of anything
            if isinstance(event, TaskCancel) and event.request_id in self._ids:
                return event
        return None

    def _heard(self, cancel: TaskCancel) -> None:
        with self._lock:
            self._grace = cancel.grace_s
            self._abort = (cancel.reason or "another shard aborted") if cancel.abort else None
        _LOG.warning(
            "%s: %s (%s)",
            self._request_id,
            "its rollout aborted" if cancel.abort else "canceled",
            cancel.reason or "no reason given",
        )
        with contextlib.suppress(OSError):  # the run ended meanwhile: no reader
            os.write(self._write_fd, b"!")


class InstallationLog:
    """The installation's log as a coordinator with no runtime uses it: where
    its progress and its shard's abort go, where cancels and checkpoints are
    read from."""

    def __init__(self, settings: Settings, *, control_every_s: float = CONTROL_EVERY_S) -> None:
        from mayfly.app.wiring import open_event_log

        self.settings = settings
        self.log = open_event_log(settings)
        self.sink = EventLogSink(self.log, settings.topics)
        """Progress events to the results topic, a shard's abort to the control topic."""
        self.checkpoints = LogCheckpoints(settings)
        self._control_every_s = control_every_s

    def control(self, request: TaskRequest) -> LogControl:
        """A watch on the cancels of ``request``, running until closed."""
        return LogControl(
            self.log, self.settings.topics.control, request, every_s=self._control_every_s
        )

    def progress(self, request: TaskRequest, coordinator: str) -> ProgressReporter:
        """The reporter of ``request``'s progress, with checkpoints when its
        rollout can be picked up where it stopped."""
        resumable = request.rollout is not None and request.rollout.resumable
        return ProgressReporter(request, coordinator, self.sink.emit, checkpoint=resumable)

    def close(self) -> None:
        self.log.close()


def installation_log(settings: Settings) -> InstallationLog | None:
    """The installation's log when ``MAYFLY_EVENT_LOG`` is Kafka; None otherwise
    (an embedded log is one machine's, where ``mayfly up`` runs requests)."""
    return InstallationLog(settings) if settings.event_log_is_kafka else None


def standalone_pipeline(
    settings: Settings, coordinator: Coordinator, sink: ResultSink | None
) -> tuple[RequestPipeline, InstallationLog | None]:
    """The pipeline of job mode and the coordinator function: results to
    ``sink``, a large request's shards to ``MAYFLY_SHARD_SINK``, and, with a
    Kafka log, progress, checkpoints and cancels through it (close the log
    returned once done)."""
    from mayfly.app.wiring import open_shard_sink

    state = installation_log(settings)
    if state is not None:
        coordinator.checkpoints = state.checkpoints
    pipeline = RequestPipeline(
        lambda: coordinator,
        sink,
        shards=open_shard_sink(settings),
        progress=state.progress if state is not None else None,
        control=state.control if state is not None else None,
        cancels=state.sink if state is not None else None,
    )
    return pipeline, state
