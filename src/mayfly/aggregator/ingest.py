"""Result events in, from any transport: decode, keep what is a result, aggregate.

One ingest behind every way results reach the aggregator: records the local
runtime reads from the results topic (``mayfly up``, the demo) and HTTP
deliveries to the Knative aggregator function.

HTTP answers, for a Kafka Broker Trigger or a KafkaSource sink:

- ``202`` with an empty body: the event was taken (processed, buffered as a
  part, or a duplicate), or it is not a result (a request on a shared broker);
- ``400`` with an empty body: not a decodable Mayfly event, or a part that
  contradicts its siblings. Knative's data-plane contract reads 400 as
  "unparsable event": a failed delivery that is not retried, so the event
  goes straight to the Trigger's dead-letter sink. That is where it belongs:
  kept for a person to look at (nothing is dropped silently), while a 2xx
  would acknowledge and lose it and a 5xx would retry what cannot succeed;
- ``503``: the archive is unreachable; the delivery is retried later.

Nothing a result contains can stop the ingest: a record that does not
decode is logged and handed to ``on_undecodable`` (the local runtime
dead-letters it), and its offset committed with the rest, so it is never
replayed; an event that makes the aggregator itself raise (anything but the
archive's :class:`~mayfly.errors.StoreError`) is logged and skipped, its
batch-mates aggregated one by one; over HTTP, both are a ``400``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from mayfly.aggregator.core import Aggregator, Outcome, Position
from mayfly.errors import EventError, StoreError
from mayfly.eventlog import LogRecord
from mayfly.events import MayflyEvent, TaskCompleted, TaskRejected, from_http, from_kafka

__all__ = ["Ingest", "Undecodable", "commit_offsets"]

_LOG = logging.getLogger("mayfly.aggregator")
Results = list[TaskCompleted | TaskRejected]
#: Told of each record that does not decode, and why.
Undecodable = Callable[[LogRecord, EventError], None]


def commit_offsets(records: Sequence[LogRecord]) -> dict[int, int]:
    """Per partition, the offset after the last of ``records``: what to commit
    once they are durable."""
    offsets: dict[int, int] = {}
    for record in records:
        offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
    return offsets


class Ingest:
    """Feeds an :class:`Aggregator` from records or HTTP deliveries.

    Args:
        aggregator: archives, traces and measures results; ``None`` only
            decodes and hands the events to ``on_events``.
        on_events: called with every decoded batch after it was aggregated
            (the CLI prints results, the demo counts them).
        exported: exports the spans made so far; True when they all went out
            (a consumer commits what it read only after that).
    """

    def __init__(
        self,
        aggregator: Aggregator | None,
        *,
        on_events: Callable[[list[MayflyEvent]], None] | None = None,
        exported: Callable[[], bool] | None = None,
    ) -> None:
        self.aggregator = aggregator
        self._on_events = on_events
        self._exported = exported

    def exported(self) -> bool:
        """Whether the spans of everything aggregated so far have been exported
        (waits a bounded time for them); True when there is no exporter."""
        return self._exported() if self._exported is not None else True

    def records(
        self, records: Sequence[LogRecord], *, on_undecodable: Undecodable | None = None
    ) -> dict[int, int]:
        """Aggregate one poll of the results topic.

        Args:
            records: the poll.
            on_undecodable: told of each record that does not decode (after it
                was logged); it must not raise.

        Returns:
            The offsets to commit now that the results are durable (archived),
            past the records that did not decode or could not be aggregated.

        Raises:
            StoreError: the archive would not take them; commit nothing.
        """
        events: list[MayflyEvent] = []
        positions: list[Position] = []
        for record in records:
            try:
                events.append(from_kafka(record.headers, record.key, record.value))
                positions.append((record.partition, record.offset))
            except Exception as exc:  # hostile input is bad input, whatever it raises
                error = exc if isinstance(exc, EventError) else _undecodable(exc)
                _LOG.warning(
                    "undecodable record at %s/%d@%d, skipped: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    error,
                )
                if on_undecodable is not None:
                    on_undecodable(record, error)
        self._aggregate_each(events, positions)
        return commit_offsets(records)

    def committable(self, offsets: Mapping[int, int]) -> dict[int, int]:
        """``offsets`` (what was read) held back, per partition, to the first record
        whose part or shard the aggregator still buffers in memory."""
        held = self.aggregator.held_offsets() if self.aggregator is not None else {}
        return {p: min(offset, held.get(p, offset)) for p, offset in offsets.items()}

    def http(self, headers: Mapping[str, str], body: bytes) -> int:
        """One CloudEvent delivery; returns the HTTP status to answer with an empty body."""
        try:
            event = from_http(dict(headers), body)
        except Exception as exc:  # hostile input is bad input, whatever it raises
            error = exc if isinstance(exc, EventError) else _undecodable(exc)
            _LOG.warning("undecodable event (answering 400 for the dead-letter sink): %s", error)
            return 400
        if not isinstance(event, TaskCompleted | TaskRejected):
            return 202  # a request on a shared broker: not ours
        try:
            outcomes = self._aggregate([event])
        except StoreError:
            _LOG.exception("result not archived; answering 503 so it is redelivered")
            return 503
        except Exception:
            # Not the archive: redelivering the same event would fail the same way.
            _LOG.exception("%s not aggregated; answering 400 for the dead-letter sink", event.id)
            return 400
        return 400 if outcomes and outcomes[0] is Outcome.INVALID else 202

    def _aggregate_each(
        self, events: list[MayflyEvent], positions: list[Position] | None = None
    ) -> None:
        """Aggregate a batch; if it raises (not StoreError), each event on its own."""
        try:
            self._aggregate(events, positions)
        except StoreError:
            raise
        except Exception:
            _LOG.exception("a batch of %d events failed; aggregating them one by one", len(events))
            for index, event in enumerate(events):
                try:
                    self._aggregate([event], None if positions is None else [positions[index]])
                except StoreError:
                    raise
                except Exception:
                    # Dedupe keeps the ones the batch already took from counting twice.
                    _LOG.exception("%s %s not aggregated, skipped", event.event_type, event.id)

    def _aggregate(
        self, events: list[MayflyEvent], positions: list[Position] | None = None
    ) -> list[Outcome]:
        results: Results = []
        where: list[Position] = []
        for index, event in enumerate(events):
            if isinstance(event, TaskCompleted | TaskRejected):
                results.append(event)
                if positions is not None:
                    where.append(positions[index])
        outcomes: list[Outcome] = []
        if results and self.aggregator is not None:
            outcomes = self.aggregator.handle_many(
                results, positions=where if positions is not None else None
            )
        if events and self._on_events is not None:
            self._on_events(events)
        return outcomes


def _undecodable(exc: BaseException) -> EventError:
    # The decoders raise EventError only; anything else is their bug on this input.
    return EventError("data", f"cannot be decoded ({type(exc).__name__}: {exc})"[:1000])
