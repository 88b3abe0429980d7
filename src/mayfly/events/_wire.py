"""Wire-level helpers shared by the bindings: headers, content types, JSON.

Kept apart from :mod:`mayfly.events.codec` so that reading what can be read
from a broken message (:func:`peek_attributes`) needs no event model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeAlias

from mayfly.errors import EventError
from mayfly.events._base import JSON_CONTENT_TYPE, MAX_EVENT_BYTES

__all__ = [
    "ENVELOPE_ALLOWANCE",
    "JSON",
    "STRUCTURED_CONTENT_TYPE",
    "HeaderValue",
    "Headers",
    "KafkaRecord",
    "check_content_type",
    "header_items",
    "is_record",
    "parse_data",
    "peek_attributes",
    "split_headers",
    "starts_object",
]

HeaderValue: TypeAlias = bytes | str | None
Headers: TypeAlias = Mapping[str, HeaderValue] | Iterable[tuple[str, HeaderValue]]

#: Content type of a structured-mode message (Kafka and HTTP bindings).
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
# A structured message holds the envelope too; attributes are short.
ENVELOPE_ALLOWANCE = 64 * 1024


class KafkaRecord(Protocol):
    """Anything with ``headers``, ``key`` and ``value``: a
    :class:`cloudevents.kafka.KafkaMessage` or a kafka-python ``ConsumerRecord``."""

    @property
    def headers(self) -> Any: ...

    @property
    def key(self) -> Any: ...

    @property
    def value(self) -> Any: ...


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# NaN and Infinity are not JSON; accepting them would not round-trip.
JSON = json.JSONDecoder(parse_constant=_refuse_constant)


def is_record(value: object) -> bool:
    """Tell a Kafka record (headers, key, value attributes) from bare headers."""
    return (
        not isinstance(value, Mapping)
        and hasattr(value, "headers")
        and hasattr(value, "key")
        and hasattr(value, "value")
    )


def header_items(headers: Any) -> Iterable[tuple[str, HeaderValue]]:
    """(name, value) pairs of a header mapping or list of pairs."""
    if headers is None:
        return ()
    if isinstance(headers, dict) or hasattr(headers, "items"):
        items: Iterable[tuple[str, HeaderValue]] = headers.items()
        return items
    return headers  # type: ignore[no-any-return]


def split_headers(headers: Any, prefix: str) -> tuple[dict[str, Any], str | None]:
    """CloudEvent attributes from prefixed headers, and the content type."""
    # On the aggregator's hot path: plain loop, no per-header function calls.
    attributes: dict[str, Any] = {}
    content_type: str | None = None
    for name, value in header_items(headers):
        lowered = name.lower()
        if lowered.startswith(prefix):
            attribute = lowered[3:]
        elif lowered == "content-type":
            attribute = "datacontenttype"
        else:
            continue
        if isinstance(value, str):
            text = value
        elif value is None:
            text = ""
        else:
            try:
                text = bytes(value).decode()
            except UnicodeDecodeError as exc:
                raise EventError(attribute, "header value is not UTF-8") from exc
        if attribute == "datacontenttype" and lowered == "content-type":
            content_type = text
        else:
            attributes[attribute] = text
    return attributes, content_type


def starts_object(body: bytes | str) -> bool:
    """Tell whether a body could be a structured event (a JSON object)."""
    head = body[:64].lstrip()
    return head[:1] in (b"{", "{")


def check_content_type(value: object) -> None:
    """Refuse a ``datacontenttype`` other than JSON in UTF-8 (absent means JSON)."""
    if value is None or value == JSON_CONTENT_TYPE:
        return
    refused = EventError(
        "datacontenttype",
        f"{value!r} is not supported; Mayfly data is JSON"
        " (application/json, optionally with charset=utf-8)",
    )
    if not isinstance(value, str):
        raise refused
    media_type, _, parameters = value.partition(";")
    if media_type.strip().lower() != JSON_CONTENT_TYPE:
        raise refused
    for parameter in parameters.split(";"):
        name, _, setting = parameter.partition("=")
        if not name.strip():
            continue
        if name.strip().lower() != "charset" or setting.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise refused


def parse_data(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse raw ``data``: at most MAX_EVENT_BYTES of strict UTF-8 JSON."""
    if len(raw) > MAX_EVENT_BYTES:
        raise EventError(
            "data", f"is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit of one event"
        )
    try:
        return JSON.decode(raw if isinstance(raw, str) else bytes(raw).decode())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise EventError("data", f"malformed JSON: {exc}") from exc


def peek_attributes(
    headers: KafkaRecord | Headers | None, body: bytes | str | None = None
) -> dict[str, Any]:
    """Read what attributes can be read from a message that failed to decode.

    For :func:`~mayfly.events.rejection_for`. Accepts Kafka (``ce_``) and HTTP
    (``ce-``) headers, a Kafka record, and structured bodies. Never raises.
    """
    if body is None and is_record(headers):
        record: Any = headers
        headers, body = record.headers, record.value
    attributes: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        content_type = None
        for name, value in header_items(headers):
            lowered = name.lower()
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if lowered.startswith(("ce_", "ce-")):
                attributes[lowered[3:]] = text
            elif lowered == "content-type":
                content_type = text
        if attributes:
            if content_type is not None:
                attributes.setdefault("datacontenttype", content_type)
        elif body and len(body) <= MAX_EVENT_BYTES + ENVELOPE_ALLOWANCE:
            envelope = json.loads(body)
            if isinstance(envelope, dict):
                envelope.pop("data", None)
                envelope.pop("data_base64", None)
                attributes.update(envelope)
    return attributes
