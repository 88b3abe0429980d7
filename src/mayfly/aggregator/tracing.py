"""Results into traces: one trace per request, through the OpenTelemetry API.

The trace of a completed request continues the publisher's ``traceparent``::

    task <task>          CONSUMER  published_at (else received_at) .. finished_at
    ├── device <id>      INTERNAL  the device's own started_at .. finished_at
    └── device <id>      ...       never started: zero length at its
                                   finished_at, else at received_at

A request run in shards (one coordinator each) is one trace all the same: the
root holds a ``shard <i>/<n>`` span per shard (its coordinator, its own
received_at .. finished_at), and each device span is a child of its shard's.

Ids are derived from the request's identity (:mod:`mayfly.spanids`): a
result traced again after a crash makes the very same spans, in the same
trace, not a second trace.

Times are the result's own, in nanoseconds, so Jaeger shows when things
happened, not when the aggregator heard of them. Publisher and coordinator
clocks may disagree a little: the root is widened to hold every device span
rather than show a child outside its parent.

A device span carries the package's lines on that device as events: ``log``
(``ctx.log``: level, message, attempt) and ``progress`` (``ctx.progress``:
percent, message), at the time they were written.

Span status: ``OK`` for a succeeded device; ``ERROR`` with the device's error
for a failed, timed out, canceled or unfinished one; ``UNSET`` for a skipped
one (the rollout stopped before it: nothing went wrong on that device). The
root is ``ERROR`` unless the request succeeded. A rejection is one ``ERROR``
root span carrying the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from mayfly.aggregator.archive import dedupe_key
from mayfly.aggregator.attributes import (
    CE_EVENT_ID,
    CE_EVENT_SOURCE,
    CE_EVENT_TYPE,
    CE_SPEC_VERSION,
    COLD_START_MS,
    COORDINATOR_ID,
    COORDINATOR_MODE,
    DEVICE_ATTEMPTS,
    DEVICE_COUNT,
    DEVICE_ID,
    DEVICE_STATUS,
    LOG_ATTEMPT,
    LOG_LEVEL,
    LOG_MESSAGE,
    MESSAGING_DESTINATION,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    PACKAGE_DIGEST,
    PACKAGE_VERSION,
    PROGRESS_PERCENT,
    REJECTED_STATUS,
    REJECTION_CODE,
    REJECTION_FIELD,
    REQUEST_ID,
    REQUEST_STATUS,
    TASK,
)
from mayfly.aggregator.windows import task_window
from mayfly.events import (
    SPECVERSION,
    TASK_COMPLETED,
    TASK_REJECTED,
    DeviceResult,
    DeviceStatus,
    OverallStatus,
    TaskCompleted,
    TaskRejected,
)
from mayfly.spanids import derived_ids, next_id
from mayfly.topics import Topics

__all__ = ["DEFAULT_DESTINATION", "ResultTracer", "trace_id_of"]

#: Topic results arrive on unless the caller says otherwise.
DEFAULT_DESTINATION = Topics().results

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_PROPAGATOR = TraceContextTextMapPropagator()
_OK = Status(StatusCode.OK)
_NOT_FAILURES = frozenset({DeviceStatus.SUCCEEDED, DeviceStatus.SKIPPED})


def _ns(moment: datetime) -> int:
    # Integer arithmetic: float seconds would blur the microseconds.
    return (moment - _EPOCH) // _MICROSECOND * 1000


def _parent(traceparent: str | None, tracestate: str | None) -> Context | None:
    if traceparent is None:
        return None  # a new trace
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier)


class ResultTracer:
    """Emits the spans of complete results and rejections.

    Args:
        tracer: where spans go.
        messaging_system: ``messaging.system``: ``kafka`` or ``sqlite``.
        destination: default ``messaging.destination.name`` (the topic).
    """

    def __init__(
        self,
        tracer: Tracer,
        *,
        messaging_system: str = "kafka",
        destination: str = DEFAULT_DESTINATION,
    ) -> None:
        self._tracer = tracer
        self.messaging_system = messaging_system
        self.destination = destination
        self._constant: dict[str, AttributeValue] = {
            CE_SPEC_VERSION: SPECVERSION,
            MESSAGING_SYSTEM: messaging_system,
            MESSAGING_DESTINATION: destination,
            MESSAGING_OPERATION_TYPE: "process",
        }

    def _envelope(
        self, event_id: str, event_type: str, source: str, destination: str | None
    ) -> dict[str, AttributeValue]:
        attributes = self._constant.copy()
        attributes[CE_EVENT_ID] = event_id
        attributes[CE_EVENT_TYPE] = event_type
        attributes[CE_EVENT_SOURCE] = source
        if destination is not None:
            attributes[MESSAGING_DESTINATION] = destination
        return attributes

    def trace_completed(self, result: TaskCompleted, *, destination: str | None = None) -> float:
        """Emit the trace of one whole (merged) result; its ids are derived from
        the request's identity, so tracing it again makes the same spans.

        Returns:
            The root span's length in seconds (the request's duration).
        """
        with derived_ids(dedupe_key(result)):
            return self._trace_completed(result, destination)

    def _trace_completed(self, result: TaskCompleted, destination: str | None) -> float:
        task = result.task
        start, end = task_window(result)
        start_ns, end_ns = _ns(start), _ns(end)
        received_ns = _ns(result.timings.received_at)
        devices = result.devices
        # Device times first, so the root can be widened to hold them.
        windows: list[tuple[int, int]] = []
        for device in devices:
            if device.started_at is not None:
                d_start = _ns(device.started_at)
                d_end = _ns(device.finished_at) if device.finished_at is not None else end_ns
                d_end = max(d_end, d_start)
            else:
                d_start = d_end = (
                    _ns(device.finished_at) if device.finished_at is not None else received_ns
                )
            windows.append((d_start, d_end))
            start_ns = min(start_ns, d_start)
            end_ns = max(end_ns, d_end)

        attributes = self._envelope(result.id, TASK_COMPLETED, result.source, destination)
        attributes[TASK] = task
        attributes[REQUEST_ID] = result.request_id
        attributes[REQUEST_STATUS] = result.status.value
        attributes[PACKAGE_VERSION] = result.package.version
        attributes[PACKAGE_DIGEST] = result.package.digest
        attributes[DEVICE_COUNT] = len(devices)
        attributes[COORDINATOR_ID] = result.coordinator.id
        attributes[COORDINATOR_MODE] = result.coordinator.mode
        if result.timings.cold_start_ms is not None:
            attributes[COLD_START_MS] = result.timings.cold_start_ms
        start_span = self._tracer.start_span
        root = start_span(
            f"task {task}",
            context=_parent(result.traceparent, result.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=start_ns,
        )
        context = trace.set_span_in_context(root)
        if not result.shards:
            failed, first_error = self._device_spans(devices, windows, context)
        else:
            failed, first_error, first = 0, None, 0
            for run in result.shards:
                last = first + run.devices
                s_windows = windows[first:last]
                s_start = min([_ns(run.timings.received_at), *(w[0] for w in s_windows)])
                s_end = max([_ns(run.timings.finished_at), *(w[1] for w in s_windows)])
                shard_span = start_span(
                    f"shard {run.index + 1}/{len(result.shards)}",
                    context=context,
                    attributes={
                        COORDINATOR_ID: run.coordinator.id,
                        COORDINATOR_MODE: run.coordinator.mode,
                        REQUEST_STATUS: run.status.value,
                        DEVICE_COUNT: run.devices,
                    },
                    start_time=s_start,
                )
                s_failed, s_error = self._device_spans(
                    devices[first:last], s_windows, trace.set_span_in_context(shard_span)
                )
                failed += s_failed
                first_error = first_error or s_error
                if run.status is OverallStatus.SUCCEEDED:
                    shard_span.set_status(_OK)
                else:
                    shard_span.set_status(Status(StatusCode.ERROR, s_error or run.status.value))
                shard_span.end(end_time=s_end)
                first = last
        if result.status is OverallStatus.SUCCEEDED:
            root.set_status(_OK)
        else:
            summary = f"{result.status.value}: {failed} of {len(devices)} device(s) failed"
            root.set_status(
                Status(StatusCode.ERROR, f"{summary}; {first_error}" if first_error else summary)
            )
        root.end(end_time=end_ns)
        return (end_ns - start_ns) / 1e9

    def _device_spans(
        self,
        devices: Sequence[DeviceResult],
        windows: Sequence[tuple[int, int]],
        context: Context,
    ) -> tuple[int, str | None]:
        """One span per device under ``context``; returns how many failed, and
        the first failure."""
        failed = 0
        first_error: str | None = None
        start_span = self._tracer.start_span
        for device, (d_start, d_end) in zip(devices, windows, strict=True):
            d_status = device.status
            span = start_span(
                f"device {device.device_id}",
                context=context,
                attributes={
                    DEVICE_ID: device.device_id,
                    DEVICE_STATUS: d_status.value,
                    DEVICE_ATTEMPTS: device.attempts,
                },
                start_time=d_start,
            )
            for line in device.logs:
                event: dict[str, AttributeValue] = {
                    LOG_LEVEL: line.level,
                    LOG_MESSAGE: line.message,
                    LOG_ATTEMPT: line.attempt,
                }
                if line.percent is not None:
                    event[PROGRESS_PERCENT] = line.percent
                name = "progress" if line.level == "progress" else "log"
                span.add_event(name, event, timestamp=_ns(line.at))
            if d_status is DeviceStatus.SUCCEEDED:
                span.set_status(_OK)
            elif d_status not in _NOT_FAILURES:
                failed += 1
                error = device.error or d_status.value
                if first_error is None:
                    first_error = f"{device.device_id}: {error}"
                span.set_status(Status(StatusCode.ERROR, error))
            span.end(end_time=d_end)
        return failed, first_error

    def trace_rejected(self, rejection: TaskRejected, *, destination: str | None = None) -> None:
        """Emit one ERROR span for a rejection, from the request's publication if known."""
        with derived_ids(dedupe_key(rejection)):
            self._trace_rejected(rejection, destination)

    def _trace_rejected(self, rejection: TaskRejected, destination: str | None) -> None:
        attributes = self._envelope(rejection.id, TASK_REJECTED, rejection.source, destination)
        attributes[REQUEST_STATUS] = REJECTED_STATUS
        attributes[REJECTION_CODE] = rejection.code.value
        if rejection.task is not None:
            attributes[TASK] = rejection.task
        if rejection.request_id is not None:
            attributes[REQUEST_ID] = rejection.request_id
        if rejection.field is not None:
            attributes[REJECTION_FIELD] = rejection.field
        end_ns = _ns(rejection.time)
        published = _requested_at(rejection)
        start_ns = min(published, end_ns) if published is not None else end_ns
        span = self._tracer.start_span(
            f"task {rejection.task or 'unknown'} rejected",
            context=_parent(rejection.traceparent, rejection.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=start_ns,
        )
        span.set_status(Status(StatusCode.ERROR, rejection.reason))
        span.end(end_time=end_ns)


def trace_id_of(outcome: TaskCompleted | TaskRejected) -> str:
    """The id (32 hex digits) of the trace :class:`ResultTracer` makes of ``outcome``.

    The publisher's trace when the request carried one; else the trace id its
    root span draws first from the ids derived from the request's identity.
    """
    if outcome.traceparent is not None:
        return outcome.traceparent.split("-")[1]
    with derived_ids(dedupe_key(outcome)):
        drawn = next_id(128)
    assert drawn is not None  # inside derived_ids
    return f"{drawn:032x}"


def _requested_at(rejection: TaskRejected) -> int | None:
    """When the rejected request was published, if its ``time`` attribute was readable."""
    raw = rejection.original.get("time")
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return _ns(moment) if moment.tzinfo is not None else None
