"""The local runtime: dispatcher, warm parent and aggregator in one command.

``mayfly up`` runs this. It plays on one machine the part Knative plays on a
cluster: requests wait in priority lanes of the event log, a coordinator
process is started for each one, results land on the results topic, and the
aggregator turns them into traces and archived insights.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from mayfly.backends import open_event_log
from mayfly.coordinator.entry import build_coordinator, exit_code_for
from mayfly.coordinator.sinks import deliver
from mayfly.errors import EventError, MayflyError, SinkError
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    from_kafka,
    peek_attributes,
    rejection_for,
)
from mayfly.runtime.dispatcher import Dispatcher, DispatcherOptions
from mayfly.runtime.eventlog import EventLog, LogRecord
from mayfly.runtime.logsink import EventLogSink
from mayfly.runtime.spawner import Spawner
from mayfly.runtime.state import RuntimeState
from mayfly.settings import Settings

__all__ = ["AGGREGATOR_GROUP", "Runtime", "prepare_coordinator"]

AGGREGATOR_GROUP = "mayfly-aggregator"
_LOG = logging.getLogger("mayfly.runtime")
_UNDELIVERED = 6


def prepare_coordinator(settings: Settings) -> Callable[[LogRecord, datetime], int]:
    """Runs in the warm parent: wire everything once, return the per-request body.

    The body's ``before_fork`` (see :data:`mayfly.runtime.spawner.Prepare`)
    refreshes the parsed inventory in the warm parent, so coordinators inherit
    it: parsing it in each coordinator instead cost 0.14 s per request for a
    fleet of 2,000 devices, most of a coordinator's CPU (bench/pipeline.py).
    """
    coordinator = build_coordinator(settings, "local")
    coordinator.repository.store.list_keys("")  # touch the store: fail early, warm caches
    try:
        coordinator.warm()
    except MayflyError as exc:
        # Not fatal here: a request that needs the inventory is rejected with the reason.
        _LOG.warning("inventory not loaded yet: %s", exc)
    state = RuntimeState(settings.runtime_dir / "state.db")
    log = open_event_log(settings)
    assume_topics = getattr(log, "assume_topics", None)  # Kafka's; not imported for SQLite
    if assume_topics is not None:
        # A coordinator runs a request the dispatcher read from a lane, and the
        # dispatcher created every topic of the installation before reading.
        assume_topics(settings.topics.all())

    def run(record: LogRecord, dequeued_at: datetime) -> int:
        outcome: TaskCompleted | TaskRejected
        try:
            event = from_kafka(record.headers, record.key, record.value)
        except EventError as exc:
            outcome = rejection_for(exc, peek_attributes(record.headers, record.value))
        else:
            if isinstance(event, TaskRequest):
                outcome = coordinator.renewed().handle(event, received_at=dequeued_at)
            else:
                outcome = rejection_for(
                    EventError("type", f"{event.event_type} on a request lane"),
                    event.cloudevent_attributes(),
                )
        try:
            deliver(EventLogSink(log, settings.topics), outcome)
        except SinkError:
            _LOG.exception("result of %s not made durable", record.offset)
            return _UNDELIVERED
        request_id = outcome.request_id
        if request_id:
            state.mark_result(request_id)
        return int(exit_code_for(outcome))

    def before_fork() -> None:
        # A file inventory is re-read only when it changed; an S3 one would cost a
        # GET per fork here, serialising every start behind it: coordinators fetch
        # that themselves.
        if not settings.inventory.startswith("s3://"):
            with contextlib.suppress(MayflyError):
                coordinator.warm()

    run.before_fork = before_fork  # type: ignore[attr-defined]
    return run


class Runtime:
    """Everything ``mayfly up`` runs, startable and stoppable from tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_results: Callable[[list[MayflyEvent]], None] | None = None,
        on_dispatch: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.log: EventLog = open_event_log(settings)
        self.state = RuntimeState(settings.runtime_dir / "state.db")
        self.spawner = Spawner(lambda: prepare_coordinator(settings))
        self._on_results = on_results
        self._on_dispatch = on_dispatch
        self._stop = threading.Event()
        self._aggregator: threading.Thread | None = None
        self.dispatcher: Dispatcher | None = None

    def start(self) -> None:
        # The warm parent is forked first, while this process has one thread.
        self.spawner.start()
        self.dispatcher = Dispatcher(
            self.log,
            self.spawner,
            self.state,
            DispatcherOptions(
                max_coordinators=self.settings.max_coordinators,
                per_task_cap=self.settings.per_task_cap,
            ),
            on_event=self._on_dispatch,
            topics=self.settings.topics,
        )
        if self._on_results is not None:
            self._aggregator = threading.Thread(
                target=self._aggregate, name="mayfly-aggregator", daemon=True
            )
            self._aggregator.start()

    def _aggregate(self) -> None:
        assert self._on_results is not None
        consumer = self.log.consumer(AGGREGATOR_GROUP, self.settings.topics.results)
        try:
            while not self._stop.is_set():
                records = consumer.poll(500, 0.2)
                events: list[MayflyEvent] = []
                for record in records:
                    try:
                        events.append(from_kafka(record.headers, record.key, record.value))
                    except EventError:
                        _LOG.warning("undecodable record at results offset %d", record.offset)
                if events:
                    self._on_results(events)
                if records:
                    # After the handler made it durable (archive), never before.
                    consumer.commit({0: records[-1].offset + 1})
        finally:
            consumer.close()

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Serve until ``should_stop()`` or :meth:`stop`."""
        if self.dispatcher is None:
            self.start()
        assert self.dispatcher is not None
        self.dispatcher.run(lambda: self._stop.is_set() or bool(should_stop and should_stop()))

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._aggregator is not None:
            self._aggregator.join(timeout=10)
        self.spawner.stop()
        self.state.close()
        self.log.close()
