"""Wire-level helpers shared by the bindings: headers, content types, JSON.

Kept apart from :mod:`mayfly.events.codec` so that reading what can be read
from a broken message (:func:`peek_attributes`) needs no event model.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeAlias

from mayfly.errors import EventError
from mayfly.events._base import JSON_CONTENT_TYPE, MAX_ATTRIBUTE_NAME_CHARS, MAX_EVENT_BYTES
from mayfly.jsondepth import check_depth

__all__ = [
    "ENVELOPE_ALLOWANCE",
    "JSON",
    "KNOWN_ATTRIBUTES",
    "MAX_ATTRIBUTE_CHARS",
    "MAX_EXTENSION_ATTRIBUTES",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE_BYTES",
    "STRUCTURED_CONTENT_TYPE",
    "HeaderValue",
    "Headers",
    "KafkaRecord",
    "LoneSurrogateError",
    "check_attributes",
    "check_content_type",
    "check_depth",
    "header_items",
    "is_record",
    "loads",
    "parse_data",
    "parse_json",
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
#: Largest message body (structured envelope and data) any decoder reads.
MAX_MESSAGE_BYTES = MAX_EVENT_BYTES + ENVELOPE_ALLOWANCE

# Bounds on what one message may make a decoder do. Each is far above what
# Mayfly produces and far below what would exhaust a consumer: a record is
# refused (and dead-lettered) before it can cost a recursion error or copy
# megabytes of attributes into its own rejection.

#: Deepest nesting of JSON arrays and objects in ``data`` (the data object is
#: level 1). CPython's json recurses once per level and stops at the
#: interpreter's recursion limit (1,000) with a RecursionError, not a
#: ValueError, so deeper input is refused before it is parsed.
MAX_JSON_DEPTH = 64
#: Extension attributes (beyond the CloudEvents core and Mayfly's own) per event.
MAX_EXTENSION_ATTRIBUTES = 64
#: Longest attribute value, in characters (a header value of 4 KiB).
MAX_ATTRIBUTE_CHARS = 4096
#: The CloudEvents core attributes and Mayfly's extensions.
KNOWN_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "datacontenttype",
        "dataschema",
        "subject",
        "time",
        "tasktype",
        "priority",
        "partitionkey",
        "traceparent",
        "tracestate",
    }
)
# What peek_attributes keeps of a value: a rejection copies no more than this.
_PEEKED_CHARS = 1024
# C0 controls and DEL: they split or end a header line (CR, LF, NUL) on some
# transport, so no attribute value may hold one.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BYTES = bytes([*range(0x20), 0x7F])


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


def split_headers(headers: Any, prefix: str) -> tuple[dict[str, Any], str | None, dict[str, str]]:
    """CloudEvent attributes from prefixed headers, the content type, and the
    W3C trace headers (``traceparent``, ``tracestate``) as tracing
    instrumentations write them, unprefixed."""
    # On the aggregator's hot path: plain loop, no per-header function calls.
    attributes: dict[str, Any] = {}
    content_type: str | None = None
    trace: dict[str, str] = {}
    for name, value in header_items(headers):
        lowered = name.lower()
        if lowered.startswith(prefix):
            attribute = lowered[3:]
        elif lowered == "content-type":
            attribute = "datacontenttype"
        elif lowered in _W3C_TRACE_HEADERS:
            attribute = lowered
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
                if attribute in _W3C_TRACE_HEADERS and not lowered.startswith(prefix):
                    continue  # not ours to refuse: a bad one only means a new trace
                raise EventError(attribute, "header value is not UTF-8") from exc
        if attribute == "datacontenttype" and lowered == "content-type":
            content_type = text
        elif not lowered.startswith(prefix):
            trace[attribute] = text[:MAX_TRACE_HEADER_CHARS]
        else:
            attributes[attribute] = text
    return attributes, content_type, trace


#: Unprefixed headers read as the event's trace context when it carries none.
_W3C_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
#: How much of a W3C trace header is looked at (a valid one is far shorter).
MAX_TRACE_HEADER_CHARS = 1024


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


class LoneSurrogateError(ValueError):
    """Raised by :func:`loads` for a lone UTF-16 surrogate escape (``"\\ud800"``).

    Attributes:
        key: the top-level key of the object holding it, if the JSON is an
            object (escaped and cut: fit to be an error's field).
    """

    def __init__(self, key: str | None) -> None:
        super().__init__("a lone UTF-16 surrogate escape (\\ud800-\\udfff) is not a character")
        self.key = key


def loads(text: bytes | str) -> Any:
    """Strict JSON from UTF-8 bytes or text, refusing what could not be encoded again.

    Raises:
        ValueError: malformed JSON or bytes that are not UTF-8.
        LoneSurrogateError: a lone surrogate escape: JSON allows it, but no
            event holding it could be written out again (pydantic refuses to
            serialise it), so it would fail later and elsewhere.
    """
    value = JSON.decode(text if isinstance(text, str) else text.decode())
    # A surrogate comes from a \uD800-\uDFFF escape (or, in text, is there as
    # is): rare, and only then checked.
    if isinstance(text, str):
        suspect = not text.isascii() or ("\\" in text and ("\\ud" in text or "\\uD" in text))
    else:  # a one-byte search first: most events hold no backslash at all
        suspect = b"\\" in text and (b"\\ud" in text or b"\\uD" in text)
    if suspect and not _encodable(value):
        key = None
        if isinstance(value, dict):
            key = next((k for k, v in value.items() if not _encodable([k, v])), None)
        raise LoneSurrogateError(None if key is None else _shown_name(key))
    return value


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_json(raw: bytes | bytearray | memoryview | str, limit: int, field: str) -> Any:
    """Decode strict UTF-8 JSON nested at most ``limit`` deep (no size check).

    Raises:
        EventError: on ``field`` for malformed or too deeply nested JSON (on
            ``field.key`` for a lone surrogate under a key). Nothing else: a
            decoder error of any kind on hostile input is still bad input.
    """
    text = raw if isinstance(raw, bytes | str) else bytes(raw)
    check_depth(text, limit, field)
    try:
        return loads(text)
    except LoneSurrogateError as exc:
        raise EventError(f"{field}.{exc.key}" if exc.key else field, str(exc)) from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise EventError(field, f"malformed JSON: {exc}") from exc
    except RecursionError as exc:  # only if called deep in a stack already
        raise EventError(field, "JSON nested too deeply") from exc


def parse_data(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse raw ``data``: at most MAX_EVENT_BYTES of strict UTF-8 JSON, at most
    MAX_JSON_DEPTH deep."""
    if len(raw) > MAX_EVENT_BYTES:
        raise EventError(
            "data", f"is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit of one event"
        )
    return parse_json(raw, MAX_JSON_DEPTH, "data")


def check_attributes(attributes: Mapping[str, Any]) -> None:
    """Refuse attributes no transport can carry back out, or too many or too long.

    At most MAX_EXTENSION_ATTRIBUTES extensions, values of at most
    MAX_ATTRIBUTE_CHARS and without control characters (a CR/LF in a value
    would split the header it is sent in), extension values strings, booleans
    or integers (CloudEvents' JSON types for attributes). Names are not
    checked: no name is ever sent on, and where one is copied (a rejection's
    ``original``, an error's field) it is cut.

    Raises:
        EventError: naming the attribute at fault.
    """
    # The usual event in a few C calls: string values, short and ASCII without
    # a control character in all; then fewer attributes than extensions allowed.
    try:
        joined = " ".join(attributes.values())
    except TypeError:  # a value that is not a string: looked at one by one below
        pass
    else:
        if (
            len(joined) <= MAX_ATTRIBUTE_CHARS
            and joined.isascii()
            and len(joined.encode().translate(None, _CONTROL_BYTES)) == len(joined)
            and len(attributes) <= MAX_EXTENSION_ATTRIBUTES
        ):
            return
    if len(attributes) > MAX_EXTENSION_ATTRIBUTES:  # cannot be too many otherwise
        extensions = [name for name in attributes if name not in KNOWN_ATTRIBUTES]
        if len(extensions) > MAX_EXTENSION_ATTRIBUTES:
            raise EventError(
                _shown_name(extensions[MAX_EXTENSION_ATTRIBUTES]),
                f"is one of {len(extensions)} extension attributes; Mayfly accepts at most"
                f" {MAX_EXTENSION_ATTRIBUTES}",
            )
    for name, value in attributes.items():
        if type(value) is str:
            if len(value) > MAX_ATTRIBUTE_CHARS:
                raise EventError(
                    _shown_name(name),
                    f"is {len(value)} characters, over the {MAX_ATTRIBUTE_CHARS}-character"
                    " limit of an attribute",
                )
            if control := _CONTROL.search(value):
                raise EventError(
                    _shown_name(name),
                    f"contains the control character U+{ord(control[0]):04X}; attribute"
                    " values travel in headers and must not",
                )
        elif name not in KNOWN_ATTRIBUTES and value is not None and type(value) not in (bool, int):
            # The known ones are the model's to judge (a wrong type names the field too).
            raise EventError(
                _shown_name(name),
                f"must be a string, boolean or integer, got {type(value).__name__}",
            )


def _shown_name(name: str) -> str:
    """An attribute name fit to be an error's field: short, printable."""
    shown = name if name.isprintable() else repr(name)[1:-1]
    limit = MAX_ATTRIBUTE_NAME_CHARS
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def peek_attributes(
    headers: KafkaRecord | Headers | None, body: bytes | str | None = None
) -> dict[str, Any]:
    """Read what attributes can be read from a message that failed to decode.

    For :func:`~mayfly.events.rejection_for`. Accepts Kafka (``ce_``) and HTTP
    (``ce-``) headers, a Kafka record, and structured bodies. Never raises,
    and is bounded whatever the message: every known attribute and at most
    MAX_EXTENSION_ATTRIBUTES extensions, values cut to 1,024 characters, a
    structured body read only if it is within the size and depth limits.
    """
    if body is None and is_record(headers):
        record: Any = headers
        headers, body = record.headers, record.value
    attributes: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        content_type = None
        extensions = 0
        for name, value in header_items(headers):
            lowered = name.lower()
            if lowered.startswith(("ce_", "ce-")):
                attribute = lowered[3:]
                if attribute not in KNOWN_ATTRIBUTES:
                    if extensions >= MAX_EXTENSION_ATTRIBUTES:
                        continue
                    extensions += 1
                attributes[attribute[:MAX_ATTRIBUTE_NAME_CHARS]] = _peeked(value)
            elif lowered == "content-type":
                content_type = _peeked(value)
        if attributes:
            if content_type is not None:
                attributes.setdefault("datacontenttype", content_type)
        elif body and len(body) <= MAX_MESSAGE_BYTES:
            check_depth(body, MAX_JSON_DEPTH + 1)
            envelope = JSON.decode(body if isinstance(body, str) else bytes(body).decode())
            if isinstance(envelope, dict):
                envelope.pop("data", None)
                envelope.pop("data_base64", None)
                for name, value in envelope.items():
                    if name not in KNOWN_ATTRIBUTES:
                        if extensions >= MAX_EXTENSION_ATTRIBUTES:
                            continue
                        extensions += 1
                    attributes[_peeked(name[:MAX_ATTRIBUTE_NAME_CHARS])] = (
                        _peeked(value) if isinstance(value, str) else _printed(value)
                    )
    return attributes


def _peeked(value: HeaderValue) -> str:
    """A value as text a rejection, a log or SQLite can take: cut, no lone surrogate."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = text[:_PEEKED_CHARS]
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


def _printed(value: Any) -> Any:
    # Nested JSON (or a number) as it was, unless it holds a lone surrogate.
    return value if _encodable(value) else json.dumps(value)[:_PEEKED_CHARS]
