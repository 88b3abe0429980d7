"""Publishing task requests onto their priority lane of the event log."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from mayfly.eventlog import EventLog
from mayfly.events import SPECVERSION, TaskRequest, to_kafka_record
from mayfly.semconv import (
    CE_EVENT_ID,
    CE_EVENT_SOURCE,
    CE_EVENT_TYPE,
    CE_SPEC_VERSION,
    MESSAGING_DESTINATION,
    MESSAGING_KAFKA_KEY,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    OPERATION_SEND,
    SERVER_ADDRESS,
    SERVER_PORT,
)
from mayfly.topics import Topics

__all__ = ["publish_request", "server_of"]

_PROPAGATOR = TraceContextTextMapPropagator()


def publish_request(
    log: EventLog,
    request: TaskRequest,
    tracer: trace.Tracer | None = None,
    topics: Topics | None = None,
) -> TaskRequest:
    """Append a request (Kafka binary mode, keyed by partition key) to its lane.

    With a tracer, a ``send <lane>`` producer span starts the request's
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
    system = log.describe().split(":", 1)[0]
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: system,
        MESSAGING_DESTINATION: topic,
        MESSAGING_OPERATION_TYPE: OPERATION_SEND,
        MESSAGING_OPERATION_NAME: OPERATION_SEND,
        MESSAGING_MESSAGE_ID: request.id,
        CE_EVENT_ID: request.id,
        CE_EVENT_TYPE: request.event_type,
        CE_EVENT_SOURCE: request.source,
        CE_SPEC_VERSION: SPECVERSION,
        "mayfly.task": request.task,
    }
    if system == "kafka":
        attributes[MESSAGING_KAFKA_KEY] = request.partition_key
        address = server_of(log.describe())
        if address is not None:
            attributes[SERVER_ADDRESS], attributes[SERVER_PORT] = address
    # "{operation} {destination}", as the messaging conventions name spans.
    with tracer.start_as_current_span(
        f"{OPERATION_SEND} {topic}", kind=trace.SpanKind.PRODUCER, attributes=attributes
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


def server_of(where: str) -> tuple[str, int] | None:
    """``server.address`` and ``server.port`` of a Kafka log (its first
    bootstrap server, from ``kafka://host:port,...``); None for another log."""
    if not where.startswith("kafka://"):
        return None
    first = where.removeprefix("kafka://").split(",", 1)[0]
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)
