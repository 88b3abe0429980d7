"""Encodings of the event models: CloudEvent objects, Kafka records, HTTP messages.

Symmetric ``to_x``/``from_x`` pairs over frozen models; no network client is
imported. Binary mode is the default everywhere; structured mode is accepted
and produced on request.

The SDK (cloudevents 1.12) provides the CloudEvent type and the binary
encoders. Decoding and structured encoding are done here because the SDK's
versions would break the contract:

- ``cloudevents.kafka.from_binary``/``from_structured`` invent an ``id`` and a
  ``time`` when they are missing (a made-up idempotency key means a duplicate
  run) and turn the structured ``content-type`` header into
  ``datacontenttype``; ``to_structured`` writes ``application/json`` instead
  of ``application/cloudevents+json`` as the record's content type.
- ``cloudevents.http.from_http`` parses a structured body three times and
  reports a missing attribute as a Python set repr, not as a field.

Decoding parses JSON once, from the bytes on the wire, and checks the
attributes before the data. Every decoder is bounded, so that no message can
make it raise anything but :class:`~mayfly.errors.EventError` or cost more
than its size: bodies of at most ``MAX_MESSAGE_BYTES``, ``data`` of at most
``MAX_EVENT_BYTES`` nested at most ``MAX_JSON_DEPTH`` deep (checked before
parsing), at most ``MAX_EXTENSION_ATTRIBUTES`` extension attributes, values of
at most ``MAX_ATTRIBUTE_CHARS`` and free of control characters.

The ``datacontenttype`` rule: absent means JSON
(as in the CloudEvents JSON format); ``application/json`` is accepted with an
optional ``charset=utf-8``; anything else is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, overload

from cloudevents import conversion as ce_conversion
from cloudevents import exceptions as ce_exceptions
from cloudevents import kafka as ce_kafka
from cloudevents.abstract import CloudEvent as AnyCloudEvent
from cloudevents.http import CloudEvent

from mayfly.errors import EventError
from mayfly.events._base import (
    MAX_EVENT_BYTES,
    SPECVERSION,
    is_valid_traceparent,
    is_valid_tracestate,
)
from mayfly.events._wire import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_BYTES,
    STRUCTURED_CONTENT_TYPE,
    Headers,
    KafkaRecord,
    LoneSurrogateError,
    check_attributes,
    check_content_type,
    check_depth,
    is_record,
    loads,
    parse_data,
    peek_attributes,
    split_headers,
    starts_object,
)
from mayfly.events.cancel import TaskCancel
from mayfly.events.completed import TaskCompleted
from mayfly.events.progress import TaskProgress
from mayfly.events.rejected import TaskRejected
from mayfly.events.requested import TaskRequest

__all__ = [
    "STRUCTURED_CONTENT_TYPE",
    "KafkaRecord",
    "MayflyEvent",
    "Mode",
    "from_cloudevent",
    "from_http",
    "from_kafka",
    "peek_attributes",
    "to_cloudevent",
    "to_http",
    "to_kafka",
    "to_kafka_record",
]

MayflyEvent: TypeAlias = TaskRequest | TaskCompleted | TaskRejected | TaskProgress | TaskCancel
Mode: TypeAlias = Literal["binary", "structured"]

_MODELS: dict[str, type[MayflyEvent]] = {
    model.event_type: model
    for model in (TaskRequest, TaskCompleted, TaskRejected, TaskProgress, TaskCancel)
}


_STRUCTURED_BYTES = STRUCTURED_CONTENT_TYPE.encode()
_LOG = logging.getLogger("mayfly.events")


def _identity(value: bytes) -> bytes:
    return value


# --- CloudEvent objects -----------------------------------------------------


def to_cloudevent(model: MayflyEvent) -> CloudEvent:
    """The SDK CloudEvent of ``model``: string attributes, data as a JSON-ready dict."""
    return CloudEvent(model.cloudevent_attributes(), model.cloudevent_data())


def from_cloudevent(event: AnyCloudEvent) -> MayflyEvent:
    """Validate an SDK CloudEvent into its model, dispatching on ``type``.

    ``data`` may be a decoded JSON object or the raw JSON bytes/text.

    Raises:
        EventError: naming the attribute or data field that breaks the contract.
    """
    return _decode(dict(event.get_attributes()), event.get_data(), where="attributes")


# --- Kafka ------------------------------------------------------------------


def to_kafka(event: MayflyEvent | AnyCloudEvent, mode: Mode = "binary") -> ce_kafka.KafkaMessage:
    """Encode an event as a Kafka record; the key is the partition key.

    A CloudEvent is validated first, so nothing off-contract is published.

    Raises:
        EventError: if the event is invalid or its data exceeds MAX_EVENT_BYTES.
    """
    model = _as_model(event)
    attributes = model.cloudevent_attributes()
    data = _encoded_data(model)
    key = attributes["partitionkey"].encode()
    if mode == "binary":
        try:
            return ce_kafka.to_binary(
                CloudEvent(attributes, data), data_marshaller=_identity, key_mapper=lambda _: key
            )
        except ce_exceptions.GenericException as exc:
            raise EventError("data", f"cannot encode the event for Kafka: {exc}") from exc
    if mode == "structured":
        return ce_kafka.KafkaMessage(
            {"content-type": _STRUCTURED_BYTES}, key, _structured(attributes, data)
        )
    raise ValueError(f"mode must be 'binary' or 'structured', not {mode!r}")


def to_kafka_record(
    event: MayflyEvent | AnyCloudEvent, mode: Mode = "binary"
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """:func:`to_kafka` as a producer takes it: key, value and a header list of bytes."""
    message = to_kafka(event, mode)
    headers = [
        (str(name), value if isinstance(value, bytes) else str(value).encode())
        for name, value in message.headers.items()
    ]
    # The trace context also as plain W3C headers, the Kafka convention of OpenTelemetry
    # instrumentations: Knative's Kafka data plane reads `traceparent` (not the CloudEvent's
    # `ce_traceparent`) to parent its delivery spans, so they join the request's trace.
    if isinstance(event, AnyCloudEvent):
        trace = [(n, event.get(n)) for n in ("traceparent", "tracestate")]
    else:
        trace = [("traceparent", event.traceparent), ("tracestate", event.tracestate)]
    headers += [(name, str(value).encode()) for name, value in trace if value]
    return _bytes(message.key), _bytes(message.value), headers


def _bytes(value: bytes | str | None) -> bytes:
    if value is None:
        return b""
    return value if isinstance(value, bytes) else value.encode()


@overload
def from_kafka(record: KafkaRecord, /) -> MayflyEvent: ...


@overload
def from_kafka(
    headers: Headers | None, key: bytes | str | None, value: bytes | str | None
) -> MayflyEvent: ...


def from_kafka(
    headers: KafkaRecord | Headers | None,
    key: bytes | str | None = None,
    value: bytes | str | None = None,
) -> MayflyEvent:
    """Decode a Kafka record, binary or structured mode.

    Call it with a record (``KafkaMessage``, kafka-python ``ConsumerRecord``)
    or with its headers, key and value. Headers may be a mapping or a list of
    ``(name, bytes)`` pairs (kafka-python); names are case-insensitive.
    Structured mode is recognised by ``content-type: application/cloudevents+json``,
    or, lacking any ``ce_`` header, by a value that is a JSON object.
    A missing ``partitionkey`` attribute is taken from the record key.

    Raises:
        EventError: naming the attribute or data field at fault; ``specversion``
            when the record is not a CloudEvent at all.
    """
    if key is None and value is None and is_record(headers):
        record: Any = headers
        headers, key, value = record.headers, record.key, record.value
    attributes, content_type, trace = split_headers(headers, "ce_")
    key_text: str | None = None
    if isinstance(key, bytes | bytearray):
        try:
            key_text = bytes(key).decode()
        except UnicodeDecodeError as exc:
            raise EventError("partitionkey", "the Kafka record key is not UTF-8") from exc
    elif isinstance(key, str):
        key_text = key
    try:
        return _decode_message(attributes, content_type, value, key_text or None, "ce_", trace)
    except RecursionError as exc:  # the bounds make this unreachable; hostile input is bad input
        raise EventError("data", "nested too deeply to decode") from exc


# --- HTTP -------------------------------------------------------------------


def to_http(
    event: MayflyEvent | AnyCloudEvent, mode: Mode = "binary"
) -> tuple[dict[str, str], bytes]:
    """Encode an event as HTTP headers and body.

    Raises:
        EventError: if the event is invalid or its data exceeds MAX_EVENT_BYTES.
    """
    model = _as_model(event)
    attributes = model.cloudevent_attributes()
    data = _encoded_data(model)
    if mode == "binary":
        try:
            headers, body = ce_conversion.to_binary(
                CloudEvent(attributes, data), data_marshaller=_identity
            )
        except ce_exceptions.GenericException as exc:
            raise EventError("data", f"cannot encode the event for HTTP: {exc}") from exc
        return dict(headers), bytes(body)
    if mode == "structured":
        return {"content-type": STRUCTURED_CONTENT_TYPE}, _structured(attributes, data)
    raise ValueError(f"mode must be 'binary' or 'structured', not {mode!r}")


def from_http(headers: Headers | None, body: bytes | str | None) -> MayflyEvent:
    """Decode an HTTP message, binary (``ce-`` headers) or structured mode.

    Raises:
        EventError: naming the attribute or data field at fault; ``specversion``
            when the message is not a CloudEvent at all.
    """
    attributes, content_type, trace = split_headers(headers, "ce-")
    try:
        return _decode_message(attributes, content_type, body, None, "ce-", trace)
    except RecursionError as exc:  # the bounds make this unreachable; hostile input is bad input
        raise EventError("data", "nested too deeply to decode") from exc


# --- Internals --------------------------------------------------------------


def _as_model(event: MayflyEvent | AnyCloudEvent) -> MayflyEvent:
    if isinstance(event, TaskRequest | TaskCompleted | TaskRejected | TaskProgress | TaskCancel):
        return event
    if isinstance(event, AnyCloudEvent):
        return from_cloudevent(event)
    raise TypeError(f"expected a Mayfly event model or a CloudEvent, got {type(event).__name__}")


def _encoded_data(model: MayflyEvent) -> bytes:
    data = model.data_json()
    if len(data) > MAX_EVENT_BYTES:
        raise EventError(
            "data",
            f"encodes to {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit;"
            " split large results with split_completed()",
        )
    return data


def _structured(attributes: Mapping[str, str], data: bytes) -> bytes:
    # The data is already JSON: splice it into the envelope instead of
    # decoding and re-encoding it.
    envelope = json.dumps(attributes, separators=(",", ":"), ensure_ascii=False).encode()
    return envelope[:-1] + b',"data":' + data + b"}"


def _decode_message(
    attributes: dict[str, Any],
    content_type: str | None,
    body: bytes | str | None,
    key: str | None,
    prefix: str,
    trace: Mapping[str, str],
) -> MayflyEvent:
    if content_type is not None:
        lowered = content_type.lower()
        if lowered.startswith("application/cloudevents+json"):
            return _decode_structured(body, key, lenient=False, trace=trace)
        if lowered.startswith("application/cloudevents-batch"):
            raise EventError(
                "datacontenttype", "batched CloudEvents are not supported; send one per message"
            )
    if attributes:
        if content_type is not None:
            attributes["datacontenttype"] = content_type
        if key is not None:
            attributes.setdefault("partitionkey", key)
        return _decode(attributes, body, where=f"no {prefix}specversion header", trace=trace)
    if body and starts_object(body):
        return _decode_structured(body, key, lenient=True, trace=trace)
    raise EventError(
        "specversion",
        f"not a CloudEvent: no {prefix}specversion header and no structured"
        " (application/cloudevents+json) body",
    )


def _decode_structured(
    body: bytes | str | None,
    key: str | None,
    *,
    lenient: bool,
    trace: Mapping[str, str] | None = None,
) -> MayflyEvent:
    body = body or b""
    if len(body) > MAX_MESSAGE_BYTES:
        raise EventError("data", f"the structured event is {len(body)} bytes, over the limit")
    # The envelope is one level above its data.
    check_depth(body, MAX_JSON_DEPTH + 1)
    try:
        envelope = loads(body)
    except LoneSurrogateError as exc:
        raise EventError(exc.key or "data", str(exc)) from exc
    except ValueError as exc:
        if lenient:
            raise EventError("specversion", "not a CloudEvent: the body is not JSON") from exc
        raise EventError("data", f"malformed JSON in a structured CloudEvent: {exc}") from exc
    if not isinstance(envelope, dict):
        raise EventError("specversion", "not a CloudEvent: a structured event is a JSON object")
    data = envelope.pop("data", None)
    if isinstance(data, str):
        # JSON text inside a JSON string is a producer bug, not JSON data.
        raise EventError("data", "must be a JSON object, got a string")
    encoded = envelope.pop("data_base64", None)
    if encoded is not None:
        if data is not None:
            raise EventError("data", "both data and data_base64 are set")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise EventError("data", "data_base64 is not valid base64") from exc
    if key is not None:
        envelope.setdefault("partitionkey", key)
    return _decode(envelope, data, where="no specversion in the structured event", trace=trace)


def _decode(
    attributes: dict[str, Any],
    data: Any,
    *,
    where: str,
    trace: Mapping[str, str] | None = None,
) -> MayflyEvent:
    specversion = attributes.get("specversion")
    if specversion is None:
        raise EventError("specversion", f"missing ({where}); this is not a CloudEvent")
    if specversion != SPECVERSION:
        raise EventError(
            "specversion", f"{specversion!r:.80} is not supported; Mayfly speaks CloudEvents 1.0"
        )
    _settle_trace_context(attributes, trace or {})  # before the bounds: never a rejection
    check_attributes(attributes)
    for name in ("id", "source", "type"):
        value = attributes.get(name)
        if value is None:
            raise EventError(name, "missing required attribute")
        if not isinstance(value, str) or not value:
            raise EventError(name, f"must be a non-empty string, got {value!r:.80}")
    check_content_type(attributes.get("datacontenttype"))
    model = _MODELS.get(attributes["type"])
    if model is None:
        raise EventError(
            "type", f"unknown event type {attributes['type']!r}; expected one of {sorted(_MODELS)}"
        )
    if isinstance(data, bytes | bytearray | memoryview | str):
        data = parse_data(data) if len(data) else None
    if data is None:
        raise EventError("data", "missing; a Mayfly event carries a JSON object")
    if not isinstance(data, dict):
        raise EventError("data", f"must be a JSON object, got {type(data).__name__}")
    return model.from_parts(attributes, data)


def _settle_trace_context(attributes: dict[str, Any], trace: Mapping[str, str]) -> None:
    """The event's trace context, from its ``traceparent`` attribute or else the
    W3C ``traceparent`` header; one that is not a valid W3C context starts a new
    trace (as the W3C spec asks: it is dropped, and said), never a rejection."""
    if "traceparent" not in attributes and "traceparent" in trace:
        attributes["traceparent"] = trace["traceparent"]
        if "tracestate" in trace:
            attributes.setdefault("tracestate", trace["tracestate"])
    parent = attributes.get("traceparent")
    if parent is not None and not is_valid_traceparent(parent):
        _drop_trace(attributes, "traceparent", "is no W3C trace context; it starts a new trace")
        attributes.pop("tracestate", None)
    state = attributes.get("tracestate")
    if state is not None and not is_valid_tracestate(state):
        _drop_trace(attributes, "tracestate", "is not valid; dropped")


def _drop_trace(attributes: dict[str, Any], name: str, why: str) -> None:
    # repr: nothing of a hostile id or value can forge a log line.
    value = attributes.pop(name)
    _LOG.warning(
        "%.80r %.200r: %s %.80r %s", attributes.get("type"), attributes.get("id"), name, value, why
    )
