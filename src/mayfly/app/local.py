"""The local runtime wired: dispatcher, warm parent and aggregator in one command.

``mayfly up`` and ``mayfly demo`` run this. It plays on one machine the part
Knative plays on a cluster: requests wait in priority lanes of the event log,
a coordinator process is started for each one, results land on the results
topic, and the aggregator turns them into traces and archived insights.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from mayfly.aggregator.ingest import Ingest, commit_offsets
from mayfly.app.wiring import (
    build_coordinator,
    check_event_log,
    open_event_log,
    open_repository,
)
from mayfly.coordinator import RequestPipeline
from mayfly.coordinator.params import validate_params
from mayfly.coordinator.runner import DeviceProgress
from mayfly.coordinator.zygote import TaskZygote
from mayfly.errors import EventError, MayflyError, ParamsError, StoreError, UnusableFileError
from mayfly.eventlog import EventLog, LogRecord, MultiTopicConsumer
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRequest,
    from_kafka,
    peek_attributes,
    rejection_for,
    to_kafka_record,
)
from mayfly.packages import PackageRepository
from mayfly.runtime.dispatcher import Dispatcher, DispatcherOptions, DispatchEvent
from mayfly.runtime.session import Appends, RuntimeSink
from mayfly.runtime.spawner import ForkedWork, Spawner
from mayfly.runtime.state import RuntimeState
from mayfly.settings import Settings

__all__ = ["AGGREGATOR_GROUP", "Runtime", "WarmCoordinator", "check_wiring"]

AGGREGATOR_GROUP = "mayfly-aggregator"
#: The source of the rejections the aggregator dead-letters.
AGGREGATOR_SOURCE = "/mayfly/aggregator"
_LOG = logging.getLogger("mayfly.runtime")
# Waits of the aggregator thread while the archive or the log refuses (doubling).
_RETRY_FIRST_S, _RETRY_MAX_S = 0.2, 5.0
_AGGREGATOR_POLL_S = 1.0


def check_wiring(settings: Settings) -> None:
    """Build what a coordinator needs once in this process, so a configuration
    error is raised here, before any process is forked.

    Checked, once each: a store with no package (a typo, or a new home); settings
    that cannot work (an s3:// store without credentials, a bad event log URL);
    an event log that is another application's file, not SQLite, or corrupt.

    Raises:
        ConfigError: naming the setting or the file.
        StoreError: the store does not answer.
    """
    open_repository(settings, require_packages=True).check()
    if settings.event_log_is_kafka:
        open_event_log(settings).close()  # the URL; brokers are met on first use
    else:
        check_event_log(settings)


@dataclass(frozen=True)
class _Prepared:
    """What the warm parent learnt of the record it is about to fork for."""

    record: LogRecord
    request: TaskRequest
    repository: PackageRepository | None
    """The repository with the request's ref resolved just before the fork."""
    digest: str | None = None
    """The digest of the package version the ref resolved to."""
    timeout_s: float | None = None
    """The package's ``limits.timeout_s``: how long the request may run."""


class WarmCoordinator:
    """Lives in the warm parent: wired once, it runs each request in a fork.

    :meth:`before_fork` refreshes the parsed inventory in the warm parent, so
    coordinators inherit it: parsing it in each coordinator instead cost
    0.14 s per request for a fleet of 2,000 devices, most of a coordinator's
    CPU (bench/pipeline.py). It also fetches, verifies and materialises the
    request's package version and checks its params once there (building the
    validator): only the first request for a version pays for them (about
    4.5 ms); every later coordinator inherits them done, with the ref the warm
    parent resolved just before the fork.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Started first: its imports run while this process does its own.
        self.zygote = TaskZygote()
        self.zygote.start()
        try:
            self.coordinator = build_coordinator(settings, "local", starter=self.zygote)
            self.coordinator.repository.check()  # fail early, and warm the store's client
        except BaseException:
            self.zygote.stop()
            raise
        self._repository = self.coordinator.repository
        try:
            self.coordinator.warm()
        except MayflyError as exc:
            # Not fatal here: a request that needs the inventory is rejected with the reason.
            _LOG.warning("inventory not loaded yet: %s", exc)
        self.zygote.wait_ready()
        self._prepared: _Prepared | None = None
        self._digest: str | None = None
        """The package digest this (serving) coordinator runs; set on its first request."""

    def before_fork(self, record: LogRecord) -> None:
        self.zygote.restart_if_dead()
        # A file inventory is re-read only when it changed; an S3 one would cost a
        # GET per fork here, serialising every start behind it: coordinators fetch
        # that themselves.
        if not self.settings.inventory.startswith("s3://"):
            with contextlib.suppress(MayflyError):
                self.coordinator.warm()
        self._prepared = None
        try:
            self._prepared = self._prepare(record)
        except Exception:
            # A warm-up only: the coordinator does it all again and reports what
            # fails. Whatever went wrong must not end the warm parent, and every
            # request with it.
            _LOG.exception(
                "request %s/%d@%d not prepared", record.topic, record.partition, record.offset
            )

    def _prepare(self, record: LogRecord) -> _Prepared | None:
        """Decode the request (tens of microseconds) and ready its package: on a
        version verified before, one read of the store, to resolve the ref."""
        try:
            request = from_kafka(record.headers, record.key, record.value)
        except MayflyError:
            return None  # the coordinator rejects it, with the reason
        if not isinstance(request, TaskRequest):
            return None
        ref = request.version or request.channel
        try:
            fetched = self._repository.fetch(request.task, ref)
        except MayflyError:
            return _Prepared(record, request, None)
        # The child runs the request a moment from now, as fresh a view of the
        # channel as it would get by reading it itself (forks wait for this).
        pinned = self._repository.pinned(request.task, ref, fetched.manifest.version)
        with contextlib.suppress(MayflyError):
            fetched.materialise(self.coordinator.options.cache_dir)
        # Run once, not only built: a validator's first use does work of its own.
        # On empty params, never the request's: a hostile value against a
        # backtracking pattern would stall this process, and every fork with it.
        # The request's own params are checked in its coordinator.
        with contextlib.suppress(ParamsError):
            validate_params(fetched.manifest, {})
        timeout_s = fetched.manifest.limits.timeout_s
        return _Prepared(record, request, pinned, fetched.digest, timeout_s)

    def close(self) -> None:
        self.zygote.stop()

    def accepts(self, record: LogRecord) -> bool:
        """A serving coordinator runs requests of one package digest: the one it
        was forked for (a request whose package it could not ready runs here
        too, and is rejected with the reason)."""
        prepared = self._prepared
        if prepared is None or prepared.record is not record or prepared.digest is None:
            return True
        if self._digest is None:
            self._digest = prepared.digest
        return prepared.digest == self._digest

    def run(self, record: LogRecord, dequeued_at: datetime, link: Appends) -> int:
        prepared = self._prepared
        if prepared is not None and prepared.record is not record:
            prepared = None
        if self._digest is None and prepared is not None:
            self._digest = prepared.digest
        if prepared is not None and prepared.repository is not None:
            # Only in this (forked) coordinator: the warm parent keeps its own.
            self.coordinator.repository = prepared.repository
        timeout_s = self._timeout_of(record, prepared)
        if timeout_s is not None:
            link.deadline(timeout_s)  # else the runtime's set-up budget holds
        pipeline = RequestPipeline(
            self.coordinator.renewed,
            RuntimeSink(link, self.settings.topics),
            on_progress=_log_progress,
        )
        try:
            # The dispatcher marks the result in the runtime's state once it is
            # durable: it appended it.
            handled = pipeline.handle(
                lambda: _decoded(record, prepared),
                lambda: peek_attributes(record.headers, record.value),
                received_at=dequeued_at,
            )
        finally:
            self.coordinator.repository = self._repository
        if self._digest is None and isinstance(handled.outcome, TaskCompleted):
            self._digest = handled.outcome.package.digest  # what it ran, prepared or not
        return int(handled.code)

    def _timeout_of(self, record: LogRecord, prepared: _Prepared | None) -> float | None:
        """The request's package ``timeout_s``; None when it cannot be known (the
        request is then rejected, quickly)."""
        if prepared is not None and prepared.timeout_s is not None:
            return prepared.timeout_s
        try:
            request = _decoded(record, prepared)
            if not isinstance(request, TaskRequest):
                return None
            fetched = self.coordinator.repository.fetch(
                request.task, request.version or request.channel
            )
        except MayflyError:
            return None
        return float(fetched.manifest.limits.timeout_s)


def _decoded(record: LogRecord, prepared: _Prepared | None) -> MayflyEvent:
    if prepared is not None:
        return prepared.request  # decoded from these very bytes before the fork
    return from_kafka(record.headers, record.key, record.value)


def _log_progress(request_id: str, progress: DeviceProgress) -> None:
    # `mayfly up -v` shows these; at the default level they cost a level check.
    _LOG.info(
        "%s %s %s %.0f%% %s (attempt %d)",
        request_id,
        progress.device_id,
        progress.status,
        progress.percent,
        progress.message,
        progress.attempt,
    )


def _prepare(settings: Settings) -> Callable[[], ForkedWork]:
    return lambda: WarmCoordinator(settings)


class Runtime:
    """Everything ``mayfly up`` runs, startable and stoppable from tests.

    Args:
        settings: what to run on.
        ingest: the aggregator's ingest; without one, results are not read.
        on_dispatch: told of every dispatch decision (started, finished, ...).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        ingest: Ingest | None = None,
        on_dispatch: Callable[[DispatchEvent, dict[str, object]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.log: EventLog = open_event_log(settings)
        self.state = RuntimeState(settings.runtime_dir / "state.db")
        self.spawner = Spawner(_prepare(settings))
        self.ingest = ingest
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
                serve=self.settings.coordinator_mode == "serve",
            ),
            on_event=self._on_dispatch,
            topics=self.settings.topics,
        )
        if self.ingest is not None:
            self._aggregator = threading.Thread(
                target=self._aggregate, args=(self.ingest,), name="mayfly-aggregator", daemon=True
            )
            self._aggregator.start()

    def _aggregate(self, ingest: Ingest) -> None:
        """The aggregator thread: read results, aggregate, commit; until stopped.

        Nothing a record holds ends it: a result that does not decode is
        dead-lettered and committed past, anything else that goes wrong on a
        record is logged and the record skipped (:class:`Ingest`), and an
        unreachable archive or log is waited for, the batch kept, never skipped.
        """
        # The multi-topic reader, of one topic: on Kafka the broker holds its idle
        # fetch for 2 s rather than 0.5 s, which is most of an idle runtime's CPU.
        consumer = self.log.consumer_of(AGGREGATOR_GROUP, [self.settings.topics.results])
        try:
            while not self._stop.is_set():
                try:
                    # Long: each poll of an idle Kafka consumer costs about a
                    # millisecond of CPU (0.2 s polls: 0.8 % of a core idle).
                    # It returns at the first result; a stop waits for it.
                    records = consumer.poll(500, _AGGREGATOR_POLL_S)
                except UnusableFileError:
                    raise  # a foreign or corrupt log: `mayfly up` stops with its one line
                except Exception:
                    _LOG.exception("results not read; reading again")
                    self._stop.wait(_RETRY_FIRST_S)
                    continue
                if records:
                    self._aggregate_batch(ingest, consumer, records)
        finally:
            consumer.close()

    def _aggregate_batch(
        self, ingest: Ingest, consumer: MultiTopicConsumer, records: Sequence[LogRecord]
    ) -> None:
        wait_s = _RETRY_FIRST_S
        while not self._stop.is_set():
            try:
                # After the ingest made them durable (archive), never before.
                offsets = ingest.records(records, on_undecodable=self._dead_letter_result)
            except StoreError as exc:
                _LOG.warning("results not archived, retrying in %.1f s: %s", wait_s, exc)
            except Exception:
                # Not the records (the ingest takes care of those): a bug. The
                # batch is committed past rather than replayed for ever.
                _LOG.exception("a batch of %d results failed; skipped", len(records))
                offsets = commit_offsets(records)
                break
            else:
                break
            self._stop.wait(wait_s)
            wait_s = min(wait_s * 2, _RETRY_MAX_S)
        else:
            return  # stopping: the batch is read again after a restart
        try:
            consumer.commit({self.settings.topics.results: offsets})
        except UnusableFileError:
            raise
        except Exception:
            # The next commit covers these offsets too; a crash before it replays
            # them, and the aggregator dedupes.
            _LOG.exception("results offsets not committed")

    def _dead_letter_result(self, record: LogRecord, error: EventError) -> None:
        """Put the rejection of a result that does not decode on the dead-letter topic."""
        try:
            rejected = rejection_for(
                error, peek_attributes(record.headers, record.value), source=AGGREGATOR_SOURCE
            )
            key, value, headers = to_kafka_record(rejected)
            self.log.append(self.settings.topics.dead_letter, key, value, headers)
        except Exception:
            _LOG.exception(
                "undecodable result %s/%d@%d not dead-lettered",
                record.topic,
                record.partition,
                record.offset,
            )

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
        if self.dispatcher is not None:
            self.dispatcher.close()  # its appender answers the coordinators still there
        self.spawner.stop()
        self.state.close()
        self.log.close()
