"""Results into traces: one trace per request, through the OpenTelemetry API.

The trace of a completed request continues the publisher's ``traceparent``
(its ``send <lane>`` PRODUCER span, :mod:`mayfly.eventlog.publisher`)::

    process <lane>           CONSUMER  received_at .. finished_at
    └── task <task>          INTERNAL  started_at .. finished_at
        ├── device <id>      INTERNAL  the device's own started_at .. finished_at
        └── device <id>      ...       never started: zero length at its
                                       finished_at, else at started_at

The root is the coordinator's processing of the request message, named and
described as the OpenTelemetry messaging conventions say (``{operation}
{destination}``; the request's id, lane and consumer group; ``server.*`` on
Kafka) with its CloudEvents attributes (the request's); the ``task`` span
under it carries what Mayfly knows of the run (package, coordinator,
status), and the time between the publisher's span and the root is the
request's wait in its lane.

A request run in shards (one coordinator each) is one trace all the same: the
task span holds a ``shard <i>/<n>`` span per shard (its coordinator, its own
received_at .. finished_at), and each device span is a child of its shard's.

Ids are derived from the request's identity (:mod:`mayfly.spanids`): a
result traced again after a crash makes the very same spans, in the same
trace, not a second trace.

Times are the result's own, in nanoseconds, so Jaeger shows when things
happened, not when the aggregator heard of them. Publisher and coordinator
clocks may disagree a little: a parent is widened to hold its children
rather than show a child outside its parent.

A device span carries the package's lines on that device as events: ``log``
(``ctx.log``: level, message, attempt) and ``progress`` (``ctx.progress``:
percent, message), at the time they were written.

Span status: ``OK`` for a succeeded device; ``ERROR`` with the device's error
for a failed, timed out, canceled or unfinished one (``error.type`` its
status); ``UNSET`` for a skipped one (the rollout stopped before it: nothing
went wrong on that device). The root and task spans are ``ERROR`` unless the
request succeeded (``error.type`` the request's status). A rejection is one
``process <lane>`` span, ``ERROR`` with the reason (``error.type`` its code).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
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
    ERROR_TYPE,
    LOG_ATTEMPT,
    LOG_LEVEL,
    LOG_MESSAGE,
    MESSAGING_CONSUMER_GROUP,
    MESSAGING_DESTINATION,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    OPERATION_PROCESS,
    PACKAGE_DIGEST,
    PACKAGE_VERSION,
    PROGRESS_PERCENT,
    REJECTED_STATUS,
    REJECTION_CODE,
    REJECTION_FIELD,
    REQUEST_ID,
    REQUEST_STATUS,
    SERVER_ADDRESS,
    SERVER_PORT,
    TASK,
)
from mayfly.aggregator.windows import task_window
from mayfly.events import (
    SPECVERSION,
    TASK_REQUESTED,
    DeviceResult,
    DeviceStatus,
    OverallStatus,
    Priority,
    TaskCompleted,
    TaskRejected,
)
from mayfly.spanids import derived_ids, next_id
from mayfly.topics import Topics, installation_of

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
        destination: the results topic events come from unless the caller
            says otherwise: it names the installation whose lanes and
            dispatchers' group the spans name.
        server: ``server.address`` and ``server.port`` of the log (Kafka's).
    """

    def __init__(
        self,
        tracer: Tracer,
        *,
        messaging_system: str = "kafka",
        destination: str = DEFAULT_DESTINATION,
        server: tuple[str, int] | None = None,
    ) -> None:
        self._tracer = tracer
        self.messaging_system = messaging_system
        self.destination = destination
        self._constant: dict[str, AttributeValue] = {
            CE_SPEC_VERSION: SPECVERSION,
            CE_EVENT_TYPE: TASK_REQUESTED,
            MESSAGING_SYSTEM: messaging_system,
            MESSAGING_OPERATION_TYPE: OPERATION_PROCESS,
            MESSAGING_OPERATION_NAME: OPERATION_PROCESS,
        }
        if server is not None:
            self._constant[SERVER_ADDRESS], self._constant[SERVER_PORT] = server

    def _consumed(
        self,
        request_id: str | None,
        source: str | None,
        priority: Priority,
        destination: str | None,
    ) -> tuple[str, dict[str, AttributeValue]]:
        """The name and attributes of the span of a coordinator's processing
        of the request: its message, lane and consumer group."""
        topics = installation_of(destination or self.destination) or Topics()
        lane = topics.lane(priority)
        attributes = self._constant.copy()
        attributes[MESSAGING_DESTINATION] = lane
        attributes[MESSAGING_CONSUMER_GROUP] = topics.dispatcher_group
        if source is not None:
            attributes[CE_EVENT_SOURCE] = source
        if request_id is not None:
            attributes[MESSAGING_MESSAGE_ID] = request_id
            attributes[CE_EVENT_ID] = request_id
        return f"{OPERATION_PROCESS} {lane}", attributes

    def trace_completed(self, result: TaskCompleted, *, destination: str | None = None) -> float:
        """Emit the trace of one whole (merged) result; its ids are derived from
        the request's identity, so tracing it again makes the same spans.

        Returns:
            The request's duration in seconds, from its publication (its wait
            in the lane included: :func:`~mayfly.aggregator.windows.task_window`)
            to the finish of its last device.
        """
        with derived_ids(dedupe_key(result)):
            return self._trace_completed(result, destination)

    def _trace_completed(self, result: TaskCompleted, destination: str | None) -> float:
        task = result.task
        timings = result.timings
        received_ns = _ns(timings.received_at)
        started_ns = max(_ns(timings.started_at), received_ns)
        end_ns = max(_ns(timings.finished_at), started_ns)
        devices = result.devices
        # Device times first, so their parents can be widened to hold them.
        windows: list[tuple[int, int]] = []
        for device in devices:
            if device.started_at is not None:
                d_start = _ns(device.started_at)
                d_end = _ns(device.finished_at) if device.finished_at is not None else end_ns
                d_end = max(d_end, d_start)
            else:
                d_start = d_end = (
                    _ns(device.finished_at) if device.finished_at is not None else started_ns
                )
            windows.append((d_start, d_end))
            started_ns = min(started_ns, d_start)
            end_ns = max(end_ns, d_end)
        received_ns = min(received_ns, started_ns)

        name, attributes = self._consumed(
            result.request_id, result.request_source, result.priority, destination
        )
        if timings.cold_start_ms is not None:
            attributes[COLD_START_MS] = timings.cold_start_ms
        attributes[TASK] = task
        attributes[REQUEST_ID] = result.request_id
        start_span = self._tracer.start_span
        root = start_span(
            name,
            context=_parent(result.traceparent, result.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=received_ns,
        )
        run = start_span(
            f"task {task}",
            context=trace.set_span_in_context(root),
            attributes={
                TASK: task,
                REQUEST_ID: result.request_id,
                REQUEST_STATUS: result.status.value,
                PACKAGE_VERSION: result.package.version,
                PACKAGE_DIGEST: result.package.digest,
                DEVICE_COUNT: len(devices),
                COORDINATOR_ID: result.coordinator.id,
                COORDINATOR_MODE: result.coordinator.mode,
            },
            start_time=started_ns,
        )
        context = trace.set_span_in_context(run)
        if not result.shards:
            failed, first_error = self._device_spans(devices, windows, context)
        else:
            failed, first_error, first = 0, None, 0
            for shard in result.shards:
                last = first + shard.devices
                s_windows = windows[first:last]
                s_start = max(_ns(shard.timings.received_at), started_ns)
                s_start = min([s_start, *(w[0] for w in s_windows)])
                s_end = max([_ns(shard.timings.finished_at), *(w[1] for w in s_windows)])
                s_end = min(max(s_end, s_start), end_ns)
                shard_span = start_span(
                    f"shard {shard.index + 1}/{len(result.shards)}",
                    context=context,
                    attributes={
                        COORDINATOR_ID: shard.coordinator.id,
                        COORDINATOR_MODE: shard.coordinator.mode,
                        REQUEST_STATUS: shard.status.value,
                        DEVICE_COUNT: shard.devices,
                    },
                    start_time=s_start,
                )
                s_failed, s_error = self._device_spans(
                    devices[first:last], s_windows, trace.set_span_in_context(shard_span)
                )
                failed += s_failed
                first_error = first_error or s_error
                _end_with_status(shard_span, shard.status, s_error or shard.status.value, s_end)
                first = last
        summary = f"{result.status.value}: {failed} of {len(devices)} device(s) failed"
        why = f"{summary}; {first_error}" if first_error else summary
        _end_with_status(run, result.status, why, end_ns)
        _end_with_status(root, result.status, why, end_ns)
        published_ns = min(_ns(task_window(result)[0]), received_ns)
        return (end_ns - published_ns) / 1e9

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
                span.set_attribute(ERROR_TYPE, d_status.value)
                span.set_status(Status(StatusCode.ERROR, error))
            span.end(end_time=d_end)
        return failed, first_error

    def trace_rejected(self, rejection: TaskRejected, *, destination: str | None = None) -> None:
        """Emit one ERROR span for a rejection, at the time of the rejection."""
        with derived_ids(dedupe_key(rejection)):
            self._trace_rejected(rejection, destination)

    def _trace_rejected(self, rejection: TaskRejected, destination: str | None) -> None:
        source = rejection.original.get("source")
        name, attributes = self._consumed(
            rejection.request_id, source, rejection.priority, destination
        )
        attributes[REQUEST_STATUS] = REJECTED_STATUS
        attributes[REJECTION_CODE] = rejection.code.value
        attributes[ERROR_TYPE] = rejection.code.value
        if rejection.task is not None:
            attributes[TASK] = rejection.task
        if rejection.request_id is not None:
            attributes[REQUEST_ID] = rejection.request_id
        if rejection.field is not None:
            attributes[REJECTION_FIELD] = rejection.field
        # When it was received is not known: the rejection's own time, after
        # the publisher's span (when it was published is not: the publisher
        # stamped it before its span started).
        at_ns = _ns(rejection.time)
        span = self._tracer.start_span(
            name,
            context=_parent(rejection.traceparent, rejection.tracestate),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            start_time=at_ns,
        )
        span.set_status(Status(StatusCode.ERROR, rejection.reason))
        span.end(end_time=at_ns)


def _end_with_status(span: Span, status: OverallStatus, why: str, end_ns: int) -> None:
    if status is OverallStatus.SUCCEEDED:
        span.set_status(_OK)
    else:
        span.set_attribute(ERROR_TYPE, status.value)
        span.set_status(Status(StatusCode.ERROR, why))
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
