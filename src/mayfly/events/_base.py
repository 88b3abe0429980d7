"""Shared pieces of the event contract: constants, enums, field types, the model base.

Every event model is flat (``request.task``, ``result.devices``) but knows which
of its fields are CloudEvent attributes and which form the JSON ``data``, so
one class describes both the Python value and its wire shape. Validation
errors always come out as :class:`~mayfly.errors.EventError` whose ``field``
is the wire name: ``priority``, ``partitionkey``, ``data.rollout.max_parallel``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from mayfly.errors import EventError

__all__ = [
    "COORDINATOR_SOURCE",
    "JSON_CONTENT_TYPE",
    "MAX_EVENT_BYTES",
    "PUBLISHER_SOURCE",
    "SPECVERSION",
    "TASK_CANCEL",
    "TASK_COMPLETED",
    "TASK_PROGRESS",
    "TASK_REJECTED",
    "TASK_REQUESTED",
    "DeviceId",
    "DeviceStatus",
    "EventId",
    "EventModel",
    "Name",
    "NonEmpty",
    "OverallStatus",
    "Priority",
    "SemVer",
    "TraceParent",
    "TraceState",
    "UtcDatetime",
    "contract_error",
    "format_time",
    "is_valid_traceparent",
    "is_valid_tracestate",
    "validate_model",
]

SPECVERSION = "1.0"
JSON_CONTENT_TYPE = "application/json"
TASK_REQUESTED = "dev.mayfly.task.requested"
TASK_COMPLETED = "dev.mayfly.task.completed"
TASK_REJECTED = "dev.mayfly.task.rejected"
TASK_PROGRESS = "dev.mayfly.task.progress"
TASK_CANCEL = "dev.mayfly.task.cancel"
PUBLISHER_SOURCE = "/mayfly/publisher"
COORDINATOR_SOURCE = "/mayfly/coordinator"

#: Largest encoded ``data`` (bytes of JSON) an event may carry. Kafka refuses
#: records over 1 MiB by default; the rest of the record (headers, key) fits
#: in the difference.
MAX_EVENT_BYTES = 1_000_000
#: Longest attribute name a rejection or a peek keeps of a broken event.
MAX_ATTRIBUTE_NAME_CHARS = 64


class Priority(StrEnum):
    """Priority lane of a task request: one Kafka topic per lane."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class DeviceStatus(StrEnum):
    """Where one device's execution of a task stands."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELED = "canceled"


class OverallStatus(StrEnum):
    """Outcome of a whole request across its devices."""

    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


def is_valid_traceparent(value: object) -> bool:
    """Tell whether ``value`` is a W3C ``traceparent`` Mayfly accepts.

    Version ``00`` only, lowercase hex, trace id and parent id not all zeros
    (the W3C spec makes all-zero ids invalid).
    """
    if not isinstance(value, str):
        return False
    match = _TRACEPARENT.fullmatch(value)
    return match is not None and match[1] != "0" * 32 and match[2] != "0" * 16


def is_valid_tracestate(value: object) -> bool:
    """Tell whether ``value`` is a ``tracestate`` Mayfly carries (printable
    ASCII, at most 512 characters, no edge spaces)."""
    return isinstance(value, str) and re.fullmatch(_TRACESTATE_PATTERN, value) is not None


def _check_traceparent(value: str) -> str:
    if not is_valid_traceparent(value):
        raise PydanticCustomError(
            "traceparent",
            "must be a W3C traceparent 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>"
            " with non-zero ids",
        )
    return value


def _to_utc(value: datetime) -> datetime:
    # One timezone everywhere keeps encodings stable ("...Z") and comparisons obvious.
    return value.astimezone(UTC)


def format_time(value: datetime) -> str:
    """Format a UTC datetime as RFC 3339 the way the JSON data does (``...Z``)."""
    return value.isoformat().replace("+00:00", "Z")


def _utcnow() -> datetime:
    return datetime.now(UTC)


_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# Semantic Versioning 2.0 (semver.org's regex; [0-9] because \d is Unicode-aware).
_SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_EVENT_ID_PATTERN = r"^[\x21-\x7e]{1,256}$"
# W3C trace context: printable ASCII, at most 512 characters; no space at either
# end, which an HTTP header would lose (and `requests` refuses to send).
_TRACESTATE_PATTERN = r"^(?:[\x21-\x7e](?:[\x20-\x7e]{0,510}[\x21-\x7e])?)?$"
# What a person should read instead of a regular expression.
_PATTERN_HINTS = {
    _NAME_PATTERN: "must be a name of 1-63 characters a-z, 0-9 and '-', not starting with '-'",
    _SEMVER_PATTERN: "must be a semantic version such as 1.4.0 or 2.0.0-rc.1",
    _EVENT_ID_PATTERN: "must be 1-256 visible ASCII characters, no spaces",
    _TRACESTATE_PATTERN: "must be a W3C tracestate: at most 512 printable ASCII characters",
}

#: Package, task and channel names: they become bucket prefixes and service names.
Name = Annotated[str, StringConstraints(pattern=_NAME_PATTERN)]
SemVer = Annotated[str, StringConstraints(pattern=_SEMVER_PATTERN)]
#: Request ids travel verbatim in Kafka keys and Idempotency-Key HTTP headers,
#: so they are visible ASCII without spaces.
EventId = Annotated[str, StringConstraints(pattern=_EVENT_ID_PATTERN)]
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
TraceParent = Annotated[str, AfterValidator(_check_traceparent)]
#: Travels verbatim in the ``tracestate`` header of every event a request leads to.
TraceState = Annotated[str, StringConstraints(pattern=_TRACESTATE_PATTERN)]


M = TypeVar("M", bound=BaseModel)


def contract_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field validation error that still names its wire field.

    Model validators have no location of their own; the field rides in the
    error context and :func:`validate_model` reads it back.
    """
    return PydanticCustomError("mayfly_contract", "{message}", {"field": field, "message": message})


class EventModel(BaseModel):
    """Base of the three event models.

    Subclasses say which fields are CloudEvent attributes (``attribute_fields``,
    attribute name to field name); every other field is part of ``data``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    attribute_fields: ClassVar[dict[str, str]]
    #: A publisher's typo must not be silently ignored, so requests refuse
    #: unknown data fields; results and rejections come from other Mayfly
    #: versions and are read tolerantly.
    strict_data: ClassVar[bool] = True
    data_fields: ClassVar[set[str]]
    _envelope_fields: ClassVar[frozenset[str]]

    source: NonEmpty
    time: UtcDatetime = Field(default_factory=_utcnow)
    priority: Priority = Priority.NORMAL
    traceparent: TraceParent | None = None
    tracestate: TraceState | None = None

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._envelope_fields = frozenset(cls.attribute_fields.values())
        cls.data_fields = set(cls.model_fields) - cls._envelope_fields

    # Hooks the subclasses fill in.
    def _ce_id(self) -> str:
        raise NotImplementedError

    def _ce_partition_key(self) -> str:
        raise NotImplementedError

    def _ce_tasktype(self) -> str | None:
        raise NotImplementedError

    def _check_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Cross-check attributes derived from data (``tasktype``) on decode."""
        tasktype = attributes.get("tasktype")
        expected = self._ce_tasktype()
        if tasktype is not None and expected is not None and tasktype != expected:
            raise EventError(
                "tasktype", f"{tasktype!r} does not match data.task {expected!r}; they must agree"
            )

    def cloudevent_attributes(self) -> dict[str, str]:
        """The CloudEvent attributes of this event, every value a string."""
        attributes = {
            "specversion": SPECVERSION,
            "id": self._ce_id(),
            "source": self.source,
            "type": self.event_type,
            "datacontenttype": JSON_CONTENT_TYPE,
            "time": format_time(self.time),
        }
        tasktype = self._ce_tasktype()
        if tasktype is not None:
            attributes["tasktype"] = tasktype
        attributes["priority"] = self.priority.value
        attributes["partitionkey"] = self._ce_partition_key()
        if self.traceparent is not None:
            attributes["traceparent"] = self.traceparent
        if self.tracestate is not None:
            attributes["tracestate"] = self.tracestate
        attributes.update(self._ce_extensions())
        return attributes

    def _ce_extensions(self) -> dict[str, str]:
        """Extension attributes of this event type beyond the common ones."""
        return {}

    def cloudevent_data(self) -> dict[str, Any]:
        """The event's ``data`` as JSON-ready Python values."""
        return self.model_dump(mode="json", include=self.data_fields)

    def data_json(self) -> bytes:
        """The event's ``data`` encoded as compact UTF-8 JSON."""
        # Serialised in pydantic's Rust core: no intermediate dict, no json.dumps.
        return self.model_dump_json(include=self.data_fields).encode()

    @classmethod
    def from_parts(cls, attributes: Mapping[str, Any], data: Mapping[str, Any]) -> Self:
        """Validate a model from CloudEvent attributes and a decoded ``data`` object.

        Raises:
            EventError: naming the attribute or ``data.`` path at fault.
        """
        if cls.strict_data:
            for key in data:
                if key in cls._envelope_fields:
                    raise EventError(f"data.{key}", "is an event attribute, not a data field")
            values = dict(data)
        else:
            values = {key: value for key, value in data.items() if key in cls.data_fields}
        for attribute, field in cls.attribute_fields.items():
            if attribute in attributes:
                values[field] = attributes[attribute]
        model = validate_model(cls, values)
        model._check_attributes(attributes)
        return model

    @classmethod
    def wire_name(cls, field: str) -> str:
        """The wire name of a model field: its attribute name or ``data.<field>``."""
        for attribute, name in cls.attribute_fields.items():
            if name == field:
                return attribute
        return f"data.{field}"


def validate_model(cls: type[M], values: Mapping[str, Any]) -> M:
    """Validate ``values`` into ``cls``, translating pydantic's error to EventError.

    Raises:
        EventError: for the first problem, with its dotted wire path as ``field``
            and a count of any further problems in the message.
    """
    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        raise _event_error(exc, cls) from exc


def _event_error(exc: ValidationError, cls: type[BaseModel]) -> EventError:
    first = exc.errors(include_url=False)[0]
    ctx = first.get("ctx") or {}
    loc = first["loc"]
    if first["type"] == "mayfly_contract":
        field, message = str(ctx["field"]), str(ctx["message"])
    else:
        head = str(loc[0]) if loc else ""
        if issubclass(cls, EventModel):
            head = cls.wire_name(head) if head else "data"
        path = [head, *(str(part) for part in loc[1:])]
        field = ".".join(part for part in path if part)
        shown = repr(first["input"])
        if len(shown) > 80:
            shown = shown[:77] + "..."
        text = _PATTERN_HINTS.get(str(ctx.get("pattern")), first["msg"])
        message = f"{text}, got {shown}" if first["type"] != "missing" else "missing"
    if exc.error_count() > 1:
        message += f" (and {exc.error_count() - 1} more problem(s))"
    return EventError(field or "data", message)
