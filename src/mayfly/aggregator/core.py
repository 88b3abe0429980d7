"""The aggregator: results in, traces, metrics and an archive out.

Results may come in parts (a large fan-out is split to fit Kafka records) and
may be redelivered (at-least-once delivery). The aggregator buffers the parts
of each result until all have arrived, merges them, and processes the whole
result exactly once per process:

1. archive it (durable before anything else, so a crash before the commit
   means a redelivery, not a loss);
2. emit its trace and metrics (:mod:`~mayfly.aggregator.tracing`,
   :mod:`~mayfly.aggregator.metrics`);
3. remember its request id, so redeliveries are ignored.

The memory of processed ids and the parts buffer are bounded: the oldest
entries are forgotten first. A redelivery older than the memory would be
traced again; the archive's readers still list it once.

After a restart the results after the last commit come again, and an earlier
process may have archived and traced them before it died. At its first batch
the aggregator recalls what the archive holds from a little before that
batch's oldest result: those are not archived twice, but they are traced
again, since whether their spans left the dead process cannot be known; the
ids are derived from the request (:mod:`mayfly.spanids`), so it is the same
trace with the same spans, not a second one. Their metrics are not counted
again.

Parts are buffered per run: a coordinator that crashed and a second one that
ran the same request emit different timings, so parts are grouped by request
id, coordinator id and start time and never mixed across runs. Only the first
complete run of a request is processed.

The shards of a large request (each run by its own coordinator) are buffered
the same way, by request, until every shard's whole result is in; they are
merged into one result (:func:`~mayfly.events.merge_shards`): one archive
record and one trace for the request, whichever coordinators ran it.

A buffered part or shard is in memory only, so the consumer must not commit
past its record: given the records' positions, :meth:`Aggregator.held_offsets`
says, per partition, the first record still buffered. A restart reads again
from there; what it reads again that was archived is recalled, not archived
twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from enum import StrEnum

from opentelemetry.metrics import Meter
from opentelemetry.trace import Tracer

from mayfly.aggregator.archive import ArchivedEvent, ResultArchive, dedupe_key, event_time
from mayfly.aggregator.metrics import ResultMetrics
from mayfly.aggregator.tracing import DEFAULT_DESTINATION, ResultTracer
from mayfly.errors import EventError
from mayfly.events import TaskCompleted, TaskRejected, merge_completed, merge_shards

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_DEVICES",
    "DEFAULT_MAX_REMEMBERED",
    "Aggregator",
    "Outcome",
    "Position",
]

#: Processed request ids remembered for deduplication.
DEFAULT_MAX_REMEMBERED = 100_000
#: Results whose parts are still being awaited.
DEFAULT_MAX_PENDING = 10_000
#: Device results held in shards still waiting for their siblings, at most.
DEFAULT_MAX_PENDING_DEVICES = 500_000
#: How far before the first batch's oldest result the archive is recalled: the
#: results after a commit are redelivered about in order, not exactly.
RECALL_MARGIN = timedelta(minutes=10)

_LOG = logging.getLogger("mayfly.aggregator")

_RunKey = tuple[str, str, datetime]
_HoldKey = tuple[str, object]
#: Where a record was read: its partition and offset.
Position = tuple[int, int]


class Outcome(StrEnum):
    """What :meth:`Aggregator.handle` did with one event."""

    #: A whole result or a rejection: archived, traced, measured.
    PROCESSED = "processed"
    #: A part of a result; the rest has not arrived yet.
    PENDING = "pending"
    #: Already processed, or a part already buffered: ignored.
    DUPLICATE = "duplicate"
    #: A part that contradicts the other parts of its result: the result's
    #: buffer is dropped; the event belongs on the dead-letter topic.
    INVALID = "invalid"


class Aggregator:
    """Turns result and rejection events into traces, metrics and archive records.

    Not thread-safe: one consumer loop (or one request at a time) feeds it.

    Args:
        tracer: spans go here (OpenTelemetry API).
        meter: measurements go here.
        archive: complete results and rejections are archived here; None to
            keep no archive.
        messaging_system: ``messaging.system`` of the spans, ``kafka`` or ``sqlite``.
        destination: the results topic events come from unless told otherwise
            (it names the installation whose lanes the spans name).
        server: ``server.address`` and ``server.port`` of the log (Kafka's).
        max_remembered: processed ids kept for deduplication.
        max_pending: results kept waiting for their missing parts.
        max_pending_devices: device results of waiting shards kept at most
            (about 1.4 kB each in memory); past it the oldest requests are given up.
    """

    def __init__(
        self,
        tracer: Tracer,
        meter: Meter,
        archive: ResultArchive | None,
        *,
        messaging_system: str = "kafka",
        destination: str = DEFAULT_DESTINATION,
        server: tuple[str, int] | None = None,
        max_remembered: int = DEFAULT_MAX_REMEMBERED,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_devices: int = DEFAULT_MAX_PENDING_DEVICES,
    ) -> None:
        if max_remembered < 1 or max_pending < 1:
            raise ValueError("max_remembered and max_pending must be at least 1")
        self.archive = archive
        self.spans = ResultTracer(
            tracer, messaging_system=messaging_system, destination=destination, server=server
        )
        self.metrics = ResultMetrics(meter)
        self.max_remembered = max_remembered
        self.max_pending = max_pending
        self.max_pending_devices = max_pending_devices
        # Insertion-ordered: the oldest entries are evicted first.
        self._processed: OrderedDict[str, None] = OrderedDict()
        # What an earlier process archived, recalled at the first batch.
        self._archived: OrderedDict[str, None] = OrderedDict()
        # The archive is recalled from this moment on (None: not yet; never
        # without an archive); an older result recalls further back.
        self._recalled_since: datetime | None = None
        self._shard_devices = 0  # device results buffered in _shards
        self._pending: OrderedDict[_RunKey, dict[int, TaskCompleted]] = OrderedDict()
        self._shards: OrderedDict[str, dict[int, TaskCompleted]] = OrderedDict()
        # Per buffer, per partition, the first offset of a record it holds.
        self._holds: dict[_HoldKey, dict[int, int]] = {}

    def held_offsets(self) -> dict[int, int]:
        """Per partition, the first offset of a record whose part or shard is still
        buffered: a consumer commits no further on that partition."""
        held: dict[int, int] = {}
        for hold in self._holds.values():
            for partition, offset in hold.items():
                held[partition] = min(held.get(partition, offset), offset)
        return held

    def _hold(self, key: _HoldKey, position: Position | None) -> None:
        if position is not None:
            hold = self._holds.setdefault(key, {})
            partition, offset = position
            hold[partition] = min(hold.get(partition, offset), offset)

    def _move_hold(self, source: _HoldKey, target: _HoldKey) -> None:
        for position in self._holds.pop(source, {}).items():
            self._hold(target, position)

    @property
    def pending(self) -> int:
        """Results waiting for missing parts or shards."""
        return len(self._pending) + len(self._shards)

    def handle(
        self,
        event: TaskCompleted | TaskRejected,
        *,
        destination: str | None = None,
        position: Position | None = None,
    ) -> Outcome:
        """Process one event; see :meth:`handle_many`."""
        positions = None if position is None else [position]
        return self.handle_many((event,), destination=destination, positions=positions)[0]

    def handle_many(
        self,
        events: Iterable[TaskCompleted | TaskRejected],
        *,
        destination: str | None = None,
        positions: Sequence[Position] | None = None,
    ) -> list[Outcome]:
        """Process a batch of events (one poll of a consumer), in order.

        Complete results of the batch are archived with one durable write,
        then traced. When the archive fails nothing of the batch is traced or
        marked processed, and buffered parts are kept, so redelivering the
        batch is safe.

        Args:
            events: results (whole or parts) and rejections.
            destination: the topic they came from, if not the default.
            positions: where each event was read, for :meth:`held_offsets`.

        Returns:
            One outcome per event, in order.

        Raises:
            StoreError: the archive could not take the batch; commit nothing.
        """
        outcomes: list[Outcome] = []
        ready: list[ArchivedEvent] = []
        completed_runs: list[_RunKey] = []
        in_batch: set[str] = set()
        for index, event in enumerate(events):
            position = positions[index] if positions is not None else None
            key = dedupe_key(event)
            if key in self._processed or key in in_batch:
                outcomes.append(Outcome.DUPLICATE)
                continue
            whole: TaskCompleted | TaskRejected | None = event
            if isinstance(event, TaskCompleted) and event.part.count > 1:
                whole, run = self._add_part(event, outcomes)
                self._hold(("run", run), position)
                if whole is None:
                    if outcomes[-1] is Outcome.INVALID:
                        self._holds.pop(("run", run), None)
                    continue
                if whole.shard is None:
                    completed_runs.append(run)
                else:  # the shard's buffer holds it now, until the request is archived
                    self._pending.pop(run, None)
                    self._move_hold(("run", run), ("shard", key))
            if isinstance(whole, TaskCompleted) and whole.shard is not None:
                self._hold(("shard", key), position)
                whole = self._add_shard(key, whole, outcomes)
                if whole is None:
                    if outcomes[-1] is Outcome.INVALID:
                        self._holds.pop(("shard", key), None)
                    continue
            assert whole is not None
            ready.append(whole)
            in_batch.add(key)
            outcomes.append(Outcome.PROCESSED)
        if not ready:
            return outcomes
        oldest = min(event_time(whole) for whole in ready) - RECALL_MARGIN
        if self.archive is not None and (
            self._recalled_since is None or oldest < self._recalled_since
        ):
            self._recall(oldest, self._recalled_since)
        fresh = [whole for whole in ready if dedupe_key(whole) not in self._archived]
        if self.archive is not None and fresh:
            self.archive.append(fresh)
        for run in completed_runs:
            self._pending.pop(run, None)
            self._holds.pop(("run", run), None)
        for key in in_batch:
            self._drop_shards(key)
        for whole in ready:
            key = dedupe_key(whole)
            again = key in self._archived  # archived by an earlier process: traced again only
            self._archived.pop(key, None)
            self._remember(key)
            if isinstance(whole, TaskCompleted):
                duration = self.spans.trace_completed(whole, destination=destination)
                if not again:
                    self.metrics.record_completed(whole, duration)
            else:
                self.spans.trace_rejected(whole, destination=destination)
                if not again:
                    self.metrics.record_rejected(whole)
        return outcomes

    def _recall(self, since: datetime, until: datetime | None) -> None:
        """Remember what the archive holds from ``since`` (up to ``until``, what was
        recalled before): an earlier process's work, not to be archived again.
        Raises StoreError, like append."""
        assert self.archive is not None
        for event in self.archive.read(since=since, until=until):
            self._archived[dedupe_key(event)] = None
            if len(self._archived) > self.max_remembered:
                self._archived.popitem(last=False)
        self._recalled_since = since
        if self._archived:
            _LOG.info("%d results archived before this start are known", len(self._archived))

    def _add_part(
        self, part: TaskCompleted, outcomes: list[Outcome]
    ) -> tuple[TaskCompleted | None, _RunKey]:
        run: _RunKey = (part.request_id, part.coordinator.id, part.timings.started_at)
        parts = self._pending.get(run)
        if parts is None:
            parts = self._pending[run] = {}
            while len(self._pending) > self.max_pending:
                dropped, left = self._pending.popitem(last=False)
                self._holds.pop(("run", dropped), None)
                _LOG.warning(
                    "gave up waiting for %d missing part(s) of request %s",
                    _missing_parts(left),
                    dropped[0],
                )
        index = part.part.index
        if index in parts and len(parts) < part.part.count:
            outcomes.append(Outcome.DUPLICATE)
            return None, run
        # A redelivered part of a complete run means archiving it failed
        # before: merge again (the parts stay buffered until archived).
        parts.setdefault(index, part)
        if len(parts) < part.part.count:
            outcomes.append(Outcome.PENDING)
            return None, run
        try:
            return merge_completed(parts.values()), run
        except EventError as exc:
            self._pending.pop(run, None)
            _LOG.error("dropped the parts of request %s: %s", part.request_id, exc)
            outcomes.append(Outcome.INVALID)
            return None, run

    def _add_shard(
        self, key: str, shard: TaskCompleted, outcomes: list[Outcome]
    ) -> TaskCompleted | None:
        """Buffer one shard's whole result; the request's merged result once all are in."""
        assert shard.shard is not None
        shards = self._shards.get(key)
        if shards is None:
            while len(self._shards) >= self.max_pending:
                self._give_up_oldest()
            shards = self._shards[key] = {}
        index = shard.shard.index
        first = next(iter(shards.values()), None)
        if (
            first is not None
            and first.shard is not None
            and first.shard != shard.shard.model_copy(update={"index": first.shard.index})
        ):
            # Not the request's own shard (another count): this one goes, not theirs.
            _LOG.error("a shard of %s that disagrees with its others, dropped", shard.root_id)
            outcomes.append(Outcome.INVALID)
            return None
        if index in shards and len(shards) < shard.shard.count:
            outcomes.append(Outcome.DUPLICATE)  # a shard run again: its first run counts
            return None
        if index not in shards:
            shards[index] = shard
            self._shard_devices += len(shard.devices)
            self._bound_shards(key)
        if len(shards) < shard.shard.count:
            outcomes.append(Outcome.PENDING)
            return None
        try:
            return merge_shards(shards.values())
        except EventError as exc:
            self._drop_shards(key)
            _LOG.error("dropped the shards of request %s: %s", shard.root_id, exc)
            outcomes.append(Outcome.INVALID)
            return None

    def _bound_shards(self, keep: str) -> None:
        """Past the budget of buffered device results, give up the oldest requests
        (not ``keep``, the one just added to)."""
        while self._shard_devices > self.max_pending_devices and len(self._shards) > 1:
            if next(iter(self._shards)) == keep:
                self._shards.move_to_end(keep)
            self._give_up_oldest()

    def _give_up_oldest(self) -> None:
        key, left = next(iter(self._shards.items()))
        first = next(iter(left.values()), None)
        if first is not None and first.shard is not None:
            _LOG.warning(
                "gave up waiting for %d missing shard(s) of request %s",
                first.shard.count - len(left),
                first.root_id,
            )
        self._drop_shards(key)

    def _drop_shards(self, key: str) -> None:
        dropped = self._shards.pop(key, None) or {}
        self._shard_devices -= sum(len(s.devices) for s in dropped.values())
        self._holds.pop(("shard", key), None)

    def _remember(self, key: str) -> None:
        self._processed[key] = None
        if len(self._processed) > self.max_remembered:
            self._processed.popitem(last=False)


def _missing_parts(parts: dict[int, TaskCompleted]) -> int:
    first = next(iter(parts.values()), None)
    return 0 if first is None else first.part.count - len(parts)
