"""The request pipeline: decode, dispatch on type, run or reject, deliver.

One pipeline behind every way a request reaches a coordinator (an HTTP
delivery from Knative, job mode's environment or CloudEvent file, a record the
local runtime read from a lane). The transports differ only in how they read
an event and how they answer; what happens to the event is decided here:

- a request runs, and its result is delivered; one over the shard size, when
  the pipeline has a sink for requests, is published as shards instead (each
  run by a coordinator of its own, the aggregator merging their results);
- anything that is not a valid event (bad JSON, a broken contract) is
  rejected with the reason, and the rejection is delivered (results topic and
  dead letters), so nothing is dropped silently;
- a Mayfly result or rejection is passed over, logged: it is output, not a
  request, and rejecting it could circle for ever through a broker that
  routes replies back (a rejection of a rejection of ...).

The outcome carries the :class:`~mayfly.exitcodes.ExitCode` that says whether
it is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from mayfly.coordinator.schedule import Deferred
from mayfly.coordinator.sinks import ResultSink, deliver
from mayfly.errors import EventError, SinkError
from mayfly.events import (
    MAX_CANCEL_REASON,
    DeviceStatus,
    MayflyEvent,
    OverallStatus,
    RejectionCode,
    TaskCancel,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    rejection_for,
    rollback_requests,
    to_kafka_record,
)
from mayfly.exitcodes import ExitCode

if TYPE_CHECKING:  # for its types only: `summarize` is used where no coordinator runs
    from mayfly.coordinator.core import Coordinator, Sharded
    from mayfly.coordinator.runner import ProgressFn, RunControl

__all__ = ["Handled", "Outcome", "RequestPipeline", "exit_code_for", "summarize"]

Outcome = TaskCompleted | TaskRejected
_LOG = logging.getLogger("mayfly.coordinator")


@dataclass(frozen=True)
class Handled:
    """What the pipeline did with one event."""

    outcome: Outcome | None
    """The result or rejection; ``None`` when the event was not a request."""
    code: ExitCode
    error: str | None = None
    """Why the outcome was not delivered, when it was not."""
    shards: tuple[TaskRequest, ...] = ()
    """The shards a request became (published, unless ``code`` says not)."""
    defer_until: datetime | None = None
    """When a request its schedule holds may start (``code`` is DEFERRED)."""

    @property
    def passed_over(self) -> bool:
        return self.outcome is None and not self.shards


def exit_code_for(outcome: Outcome) -> ExitCode:
    if isinstance(outcome, TaskRejected):
        # Canceled before it started: what a canceled run exits with.
        canceled = outcome.code is RejectionCode.CANCELED
        return ExitCode.FAILED if canceled else ExitCode.REJECTED
    return {
        OverallStatus.SUCCEEDED: ExitCode.OK,
        OverallStatus.PARTIAL: ExitCode.PARTIAL,
    }.get(outcome.status, ExitCode.FAILED)


def summarize(outcome: Outcome) -> str:
    """One line: the outcome and how many devices ended in each status."""
    if isinstance(outcome, TaskRejected):
        if outcome.code is RejectionCode.CANCELED:
            return f"{outcome.task or '?'}: canceled ({outcome.reason})"
        return f"rejected ({outcome.code}): {outcome.reason}"
    counts: dict[str, int] = {}
    for device in outcome.devices:
        counts[device.status] = counts.get(device.status, 0) + 1
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    aborted = f"; rollout aborted: {outcome.aborted}" if outcome.aborted else ""
    return f"{outcome.task} {outcome.package.version}: {outcome.status} ({shown}){aborted}"


class RequestPipeline:
    """Runs one event through a coordinator and delivers the outcome.

    Args:
        coordinator: the coordinator for this event (called once per event,
            so a forked process can take one under its own instance id).
        sink: where outcomes go; ``None`` leaves delivery to the caller (a
            Knative reply event).
        shards: where the shards of a large request are published (the request
            lanes); ``None`` runs every request here, whatever its size.
        progress: makes, for each request and the id of the coordinator
            instance running it, what is told of its devices' progress (a
            :class:`~mayfly.coordinator.runner.RunReporter` reports on its own
            clock too).
        control: watches, while a request runs, where its cancels come from
            (when no runtime hands them over: job mode, the functions).
        cancels: where a shard's abort is published, as a cancel of its whole
            request; by default ``shards``.
    """

    def __init__(
        self,
        coordinator: Callable[[], Coordinator],
        sink: ResultSink | None,
        *,
        shards: ResultSink | None = None,
        progress: Callable[[TaskRequest, str], ProgressFn] | None = None,
        control: Callable[[TaskRequest], AbstractContextManager[RunControl]] | None = None,
        cancels: ResultSink | None = None,
    ) -> None:
        self._coordinator = coordinator
        self.sink = sink
        self.shards = shards
        self.cancels = cancels if cancels is not None else shards
        self._progress = progress
        self._control = control

    def handle(
        self,
        read: Callable[[], MayflyEvent],
        attributes: Callable[[], Mapping[str, object]],
        *,
        received_at: datetime,
        on_start: Callable[[Coordinator], None] | None = None,
    ) -> Handled:
        """Read an event with ``read()`` and see it through.

        Args:
            read: decodes the event; raises :class:`EventError` when it cannot.
            attributes: what could be read of a broken event's attributes, for
                its rejection (id, type, tasktype, trace context).
            received_at: when the transport took the event.
            on_start: called with the coordinator before a request runs (job
                mode installs its SIGTERM handler there).
        """
        outcome: Outcome
        try:
            event = read()
        except EventError as exc:
            outcome = rejection_for(exc, attributes())
        else:
            if not isinstance(event, TaskRequest):
                _LOG.warning("passed over %s %s: not a request", event.event_type, event.id)
                return Handled(None, ExitCode.OK)
            coordinator = self._coordinator()
            if on_start is not None:
                on_start(coordinator)
            progress = self._progress
            watch = self._control(event) if self._control is not None else nullcontext()
            with watch as control:
                if control is not None:
                    coordinator.control = control
                try:
                    handled = coordinator.handle(
                        event,
                        received_at=received_at,
                        on_progress=None
                        if progress is None
                        else progress(event, coordinator.options.instance_id),
                        shard=self.shards is not None,
                    )
                finally:
                    if control is not None:
                        coordinator.control = None
            if isinstance(handled, Deferred):
                _LOG.info("%s: deferred: %s", event.id, handled.reason)
                return Handled(None, ExitCode.DEFERRED, handled.reason, defer_until=handled.until)
            if isinstance(handled, TaskCompleted | TaskRejected):
                outcome = handled
                if isinstance(handled, TaskCompleted) and handled.aborted:
                    failed = self._stop_siblings(event, handled) or self._publish_rollback(
                        event, handled
                    )
                    if failed is not None:
                        return failed
            else:
                published = self._publish_shards(handled)
                if isinstance(published, Handled):
                    return published
                outcome = published  # shards that cannot be events: the request's rejection
        if self.sink is None:
            return Handled(outcome, exit_code_for(outcome))
        try:
            deliver(self.sink, outcome)
        except SinkError as exc:
            _LOG.error("%s: outcome not delivered: %s", outcome.request_id or outcome.id, exc)
            return Handled(outcome, ExitCode.UNDELIVERED, str(exc))
        return Handled(outcome, exit_code_for(outcome))

    def _stop_siblings(self, request: TaskRequest, result: TaskCompleted) -> Handled | None:
        """A shard that aborted on its own stops the whole rollout: a cancel of
        its request, marked as its abort, on the control topic, so every other
        shard (running, or not started: then never) ends aborted and rolls back
        what it changed. A shard aborted by that cancel (its status
        ``canceled``) says nothing more. None once published, or when not a
        shard; a run again after a failure here publishes the same cancel."""
        if request.shard is None or self.cancels is None:
            return None
        if result.status is OverallStatus.CANCELED:
            return None  # its abort came from a sibling's
        shard = request.shard
        reason = f"shard {shard.index + 1} of {shard.count} aborted: {result.aborted}"
        cancel = TaskCancel.of(shard.of, 0.0, reason[:MAX_CANCEL_REASON], abort=True)
        try:
            self.cancels.emit(cancel)
        except SinkError as exc:
            _LOG.error("%s: aborted; the other shards not stopped: %s", request.id, exc)
            return Handled(None, ExitCode.UNDELIVERED, str(exc))
        _LOG.warning("%s: rollout aborted; its other shards are stopped", request.id)
        return None

    def _publish_rollback(self, request: TaskRequest, result: TaskCompleted) -> Handled | None:
        """Publish the rollout's rollback (``rollout.on_abort``) over the devices
        it changed, before its result: a run again after a failure here
        publishes the same requests (their ids derive from this one's), which
        the runtime runs once. None once published, or when there is nothing to
        do; a rollback that cannot be an event is said loudly, and the result
        still delivered (running the rollout again would not change it)."""
        rollback = request.rollout.on_abort if request.rollout else None
        changed = [d.device_id for d in result.devices if d.status is DeviceStatus.SUCCEEDED]
        if rollback is None or not changed:
            return None
        if self.shards is None:
            _LOG.warning("%s: aborted; its rollback is published by `mayfly up` only", request.id)
            return None
        try:
            undo = rollback_requests(request, rollback, changed)
            for one in undo:  # all or none: each must be an event first
                to_kafka_record(one)
        except EventError as exc:
            _LOG.error("%s: aborted; its rollback cannot be published: %s", request.id, exc)
            return None
        try:
            for one in undo:
                self.shards.emit(one)
        except SinkError as exc:
            _LOG.error("%s: rollback not published: %s", request.id, exc)
            return Handled(None, ExitCode.UNDELIVERED, str(exc))
        _LOG.warning(
            "%s: rollout aborted (%s); rollback of %s published for %d device(s): %s",
            request.id,
            result.aborted,
            rollback.task,
            len(changed),
            ", ".join(one.id for one in undo),
        )
        return None

    def _publish_shards(self, sharded: Sharded) -> Handled | TaskRejected:
        # Deterministic ids: a run again after a failure here publishes the same
        # shards, which redelivery dedupes.
        assert self.shards is not None
        try:
            for shard in sharded.shards:  # all or none: each must be an event first
                to_kafka_record(shard)
            for shard in sharded.shards:
                self.shards.emit(shard)
        except EventError as exc:  # a shard over an event's size, say: nothing to retry
            _LOG.error("%s: shards cannot be published: %s", sharded.request.id, exc)
            return rejection_for(exc, sharded.request.cloudevent_attributes())
        except SinkError as exc:
            _LOG.error("%s: shards not published: %s", sharded.request.id, exc)
            return Handled(None, ExitCode.UNDELIVERED, str(exc), sharded.shards)
        _LOG.info("%s: %d shards published", sharded.request.id, len(sharded.shards))
        return Handled(None, ExitCode.OK, shards=sharded.shards)
