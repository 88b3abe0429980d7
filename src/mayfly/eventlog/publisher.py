"""Publishing task requests onto their priority lane of the event log."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mayfly.eventlog import EventLog
from mayfly.events import TaskRequest, to_kafka_record
from mayfly.topics import Topics

__all__ = ["publish_request"]

_PROPAGATOR = TraceContextTextMapPropagator()


def publish_request(
    log: EventLog,
    request: TaskRequest,
    tracer: trace.Tracer | None = None,
    topics: Topics | None = None,
) -> TaskRequest:
    """Append a request (Kafka binary mode, keyed by partition key) to its lane.

    With a tracer, a ``publish <task>`` producer span starts the request's
    trace and its context travels in the event's ``traceparent`` (unless the
    request already carries one), so the aggregator's spans join it.

    Returns:
        The request as published (with its trace context).
    """
    topic = (topics or Topics()).lane(request.priority)
    if tracer is None or request.traceparent:
        key, value, headers = to_kafka_record(request)
        log.append(topic, key, value, headers)
        return request
    attributes = {
        "messaging.system": log.describe().split(":", 1)[0],
        "messaging.destination.name": topic,
        "messaging.operation.type": "publish",
        "cloudevents.event_id": request.id,
        "cloudevents.event_type": request.event_type,
        "mayfly.task": request.task,
    }
    with tracer.start_as_current_span(
        f"publish {request.task}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        request = request.model_copy(
            update={
                "traceparent": carrier.get("traceparent"),
                "tracestate": carrier.get("tracestate") or None,
            }
        )
        key, value, headers = to_kafka_record(request)
        log.append(topic, key, value, headers)
    return request
