"""The local runtime wired: dispatcher, warm parent and aggregator in one command.

``mayfly up`` and ``mayfly demo`` run this. It plays on one machine the part
Knative plays on a cluster: requests wait in priority lanes of the event log,
a coordinator process is started for each one, results land on the results
topic, and the aggregator turns them into traces and archived insights.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from mayfly.aggregator.ingest import Ingest, commit_offsets
from mayfly.app.wiring import check_event_log, check_store_folder, open_event_log
from mayfly.errors import EventError, StoreError, UnusableFileError
from mayfly.eventlog import EventLog, LogRecord, MultiTopicConsumer
from mayfly.events import peek_attributes, rejection_for, to_kafka_record
from mayfly.runtime.dispatcher import Dispatcher, DispatcherOptions, DispatchEvent
from mayfly.runtime.spawner import ForkedWork, Spawner
from mayfly.runtime.state import RuntimeState
from mayfly.settings import Settings

__all__ = ["Runtime", "check_wiring"]

#: The source of the rejections the aggregator dead-letters.
AGGREGATOR_SOURCE = "/mayfly/aggregator"
_LOG = logging.getLogger("mayfly.runtime")
# Waits of the aggregator thread while the archive or the log refuses (doubling).
_RETRY_FIRST_S, _RETRY_MAX_S = 0.2, 5.0
_AGGREGATOR_POLL_S = 1.0


def check_wiring(settings: Settings) -> None:
    """Check here, before any process is forked, what can be checked without the
    coordinator's code, so a configuration error is said in one line: a store
    folder with no package (a typo, or a new home); settings that cannot work (a
    bad event log URL); an event log that is another application's file, not
    SQLite, or corrupt. The rest (an S3 store, the signatures) is checked by the
    warm parent as it starts, and said the same way.

    Raises:
        ConfigError: naming the setting or the file.
    """
    check_store_folder(settings)
    if settings.event_log_is_kafka:
        open_event_log(settings).close()  # the URL; brokers are met on first use
    else:
        check_event_log(settings)


def _prepare(settings: Settings) -> Callable[[], ForkedWork]:
    def build() -> ForkedWork:
        # Imported in the warm parent only: the coordinator's dependencies (the
        # package store's signing and manifests, params schemas, the HTTP
        # driver) are no part of the `mayfly up` process.
        from mayfly.app.warm import WarmCoordinator

        return WarmCoordinator(settings)

    return build


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
                task_weights=dict(self.settings.task_weights),
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
        # A member of the aggregators' group: runtimes on one Kafka split the
        # results, so each is archived and traced by one of them. On Kafka the
        # broker holds its idle fetch for 2 s rather than 0.5 s, which is most of
        # an idle runtime's CPU.
        consumer = self.log.member_of(
            self.settings.topics.aggregator_group, [self.settings.topics.results]
        )
        held: dict[int, int] = {}
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
                    self._aggregate_batch(ingest, consumer, records, held)
        finally:
            consumer.close()

    def _aggregate_batch(
        self,
        ingest: Ingest,
        consumer: MultiTopicConsumer,
        records: Sequence[LogRecord],
        held: dict[int, int],
    ) -> None:
        """Aggregate one poll, then commit it (and what ``held`` holds) once its
        results are archived and their spans exported, and no further than a
        part or shard still buffered: a kill before either redelivers them,
        archived once and traced the same (``Aggregator``)."""
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
        for partition, offset in offsets.items():
            held[partition] = max(held.get(partition, 0), offset)
        if not ingest.exported():
            _LOG.warning("spans not exported yet; %d results' offsets held", len(records))
            return
        # Not past a part or shard still buffered: those partitions stay held.
        offsets = ingest.committable(held)
        for partition, offset in offsets.items():
            if held[partition] == offset:
                del held[partition]
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
