"""``dev.mayfly.task.rejected``: a request that could not run, and why.

Nothing is dropped silently: whatever fails to decode or to start becomes a
rejection (also sent to the dead-letter topic) built by :func:`rejection_for`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, ClassVar
from uuid import UUID, uuid4, uuid5

from pydantic import ConfigDict, Field, StringConstraints

from mayfly.errors import (
    DeviceError,
    EventError,
    IntegrityError,
    InventoryError,
    PackageError,
    PackageNotFoundError,
    ParamsError,
    RequestCanceledError,
    SigningKeyError,
    UnsafeArchiveError,
)
from mayfly.events._base import (
    COORDINATOR_SOURCE,
    MAX_ATTRIBUTE_NAME_CHARS,
    TASK_REJECTED,
    EventModel,
    NonEmpty,
    Priority,
    is_valid_traceparent,
    validate_model,
)

__all__ = ["RejectionCode", "TaskRejected", "rejection_for"]

# What is copied from a bad event is capped so a hostile input cannot make its
# own rejection too large to publish (1 MB), nor break the headers it goes out
# in: a rejection is a few KiB whatever it rejects.
_MAX_COPIED_CHARS = 1024
_MAX_REASON_CHARS = 4096
_MAX_FIELD_CHARS = 256
_MAX_ORIGINAL_ATTRIBUTES = 32
_MAX_ORIGINAL_CHARS = 16 * 1024
# The attributes most worth keeping of an original, in this order.
_FIRST_KEPT = (
    "id",
    "type",
    "source",
    "specversion",
    "time",
    "tasktype",
    "priority",
    "partitionkey",
    "traceparent",
    "tracestate",
    "datacontenttype",
    "subject",
    "dataschema",
)
_PRIORITIES = frozenset(p.value for p in Priority)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# What may travel in a header (ce-id, ce-partitionkey, Kafka key): visible
# ASCII, no spaces; the request id contract (``EventId``).
_HEADER_SAFE_ID = re.compile(r"[\x21-\x7e]{1,256}")
_HEADER_SAFE_TRACESTATE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]{0,510}[\x21-\x7e])?)?")
# Rejections of an input whose id cannot be used are named after it all the same.
_UNUSABLE_ID_NAMESPACE = UUID("8f0e5c1a-4b7d-4e0a-9d3c-6a2f1b9e7c54")


class RejectionCode(StrEnum):
    """Why a request was rejected, for dashboards and alerts."""

    INVALID_EVENT = "invalid_event"
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_DEVICE = "unknown_device"
    INVALID_PARAMS = "invalid_params"
    INTEGRITY = "integrity"
    NOT_A_CLOUDEVENT = "not_a_cloudevent"
    INTERNAL = "internal"
    CANCELED = "canceled"
    """Canceled before it started (``mayfly cancel``): on the results topic
    only, not a dead letter (nothing is wrong with it)."""


class TaskRejected(EventModel):
    """A request that could not run.

    ``request_id`` is None when the input had no usable id; ``original`` holds
    the offending event's attributes as far as they could be read.
    """

    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[str] = TASK_REJECTED
    attribute_fields: ClassVar[dict[str, str]] = {
        "id": "id",
        "source": "source",
        "time": "time",
        "priority": "priority",
        "traceparent": "traceparent",
        "tracestate": "tracestate",
    }
    strict_data: ClassVar[bool] = False

    id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    source: NonEmpty = COORDINATOR_SOURCE
    request_id: str | None = None
    reason: str
    code: RejectionCode
    field: str | None = None
    task: str | None = None
    original: dict[str, str] = Field(default_factory=dict)

    @property
    def partition_key(self) -> str:
        """The request id when known, else this event's id."""
        return self.request_id or self.id

    @property
    def tasktype(self) -> str | None:
        """The ``tasktype`` extension, when the task name is a valid one."""
        return self.task if self.task is not None and _NAME.fullmatch(self.task) else None

    def _ce_id(self) -> str:
        return self.id

    def _ce_partition_key(self) -> str:
        return self.partition_key

    def _ce_tasktype(self) -> str | None:
        return self.tasktype

    def _check_attributes(self, attributes: Mapping[str, Any]) -> None:
        # tasktype is informational here: the rejected input may have had any.
        pass


def rejection_for(
    error: BaseException,
    raw_attributes: Mapping[str, Any] | None = None,
    *,
    code: RejectionCode | str | None = None,
    source: str = COORDINATOR_SOURCE,
) -> TaskRejected:
    """Build the rejection of an event that failed to decode or to run.

    The code follows from the error unless given: an
    :class:`~mayfly.errors.EventError` on ``specversion`` for an input with no
    ``specversion`` at all is ``not_a_cloudevent``, one under ``data.params``
    is ``invalid_params``, any other is ``invalid_event``;
    :class:`~mayfly.errors.PackageNotFoundError` is ``unknown_task``, an
    inventory error ``unknown_device``, a :class:`~mayfly.errors.ParamsError`
    ``invalid_params``; digest,
    signature and archive errors are ``integrity``; a
    :class:`~mayfly.errors.RequestCanceledError` ``canceled``; anything else
    ``internal``.
    The trace context and priority of the original are carried over when valid.

    Never raises, and never makes an event too large or unfit for headers,
    whatever the input: ``original`` keeps at most 32 attributes (the
    CloudEvents ones first) of at most 1,024 characters, 16 KiB in all; the
    reason and field are cut; an id that could not travel in a header (control
    characters, spaces, over 256 characters) is not the ``request_id``, and the
    rejection's own id is then derived from it (a uuid5), so a redelivery is
    still rejected under the same id.

    Args:
        error: what went wrong.
        raw_attributes: the offending event's attributes as far as known, e.g.
            :func:`~mayfly.events.peek_attributes` of the record or a decoded
            request's ``cloudevent_attributes()``.
        code: overrides the derived code.
        source: the rejecting component.
    """
    raw = dict(raw_attributes or {})
    original = _original(raw)
    raw_id = raw.get("id")
    request_id = raw_id if isinstance(raw_id, str) and _HEADER_SAFE_ID.fullmatch(raw_id) else None
    if request_id is not None:
        # Deterministic when possible, so a redelivered bad request is rejected once.
        rejection_id = f"{request_id}:rejected"
    elif isinstance(raw_id, str) and raw_id:
        rejection_id = str(uuid5(_UNUSABLE_ID_NAMESPACE, _text(raw_id)))
    else:
        rejection_id = str(uuid4())
    field = error.field if isinstance(error, EventError | ParamsError) else None
    if field is not None:
        field = _cut(field, _MAX_FIELD_CHARS)
    try:
        reason = _reason(error)
    except Exception:  # an exception whose str() raises: its type says enough
        reason = f"internal error: {type(error).__name__}"
    task = raw.get("tasktype")
    if isinstance(error, PackageError) and error.package:
        task = error.package
    traceparent = raw.get("traceparent")
    has_trace = is_valid_traceparent(traceparent)
    tracestate = raw.get("tracestate")
    priority = raw.get("priority")
    values = {
        "id": rejection_id,
        "source": source,
        "priority": priority
        if isinstance(priority, str) and priority in _PRIORITIES
        else Priority.NORMAL,
        "traceparent": traceparent if has_trace else None,
        "tracestate": tracestate
        if has_trace
        and isinstance(tracestate, str)
        and _HEADER_SAFE_TRACESTATE.fullmatch(tracestate)
        else None,
        "request_id": request_id,
        "reason": _cut(reason, _MAX_REASON_CHARS),
        "code": code if code is not None else _code(error, raw),
        "field": field,
        "task": _text(task) if isinstance(task, str) else None,
        "original": original,
    }
    return validate_model(TaskRejected, values)


def _original(raw: Mapping[str, Any]) -> dict[str, str]:
    """A bounded copy of the original's attributes, the CloudEvents ones first."""
    names = [name for name in _FIRST_KEPT if name in raw]
    names += [name for name in raw if name not in _FIRST_KEPT]
    original: dict[str, str] = {}
    budget = _MAX_ORIGINAL_CHARS
    for name in names:
        value = raw[name]
        if value is None or name in ("data", "data_base64") or not isinstance(name, str):
            continue
        if len(original) >= _MAX_ORIGINAL_ATTRIBUTES:
            break
        text = _text(value)
        budget -= len(name) + len(text)
        if budget < 0:
            break
        original[_cut(name, MAX_ATTRIBUTE_NAME_CHARS)] = text
    return original


def _cut(text: str, limit: int) -> str:
    return _encodable(text if len(text) <= limit else text[: limit - 3] + "...")


def _encodable(text: str) -> str:
    """``text``, with any lone surrogate escaped: one would make the rejection
    impossible to encode (pydantic refuses to serialise it)."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _code(error: BaseException, raw: Mapping[str, Any]) -> RejectionCode:
    if isinstance(error, EventError):
        if error.field == "specversion" and "specversion" not in raw:
            return RejectionCode.NOT_A_CLOUDEVENT
        if error.field == "data.params" or error.field.startswith("data.params."):
            return RejectionCode.INVALID_PARAMS
        return RejectionCode.INVALID_EVENT
    if isinstance(error, PackageNotFoundError):
        return RejectionCode.UNKNOWN_TASK
    if isinstance(error, InventoryError):  # UnknownDeviceError included
        return RejectionCode.UNKNOWN_DEVICE
    if isinstance(error, ParamsError):
        return RejectionCode.INVALID_PARAMS
    if isinstance(error, IntegrityError | SigningKeyError | UnsafeArchiveError):
        return RejectionCode.INTEGRITY
    if isinstance(error, RequestCanceledError):
        return RejectionCode.CANCELED
    return RejectionCode.INTERNAL


def _reason(error: BaseException) -> str:
    if isinstance(error, EventError | ParamsError | InventoryError | DeviceError):
        return str(error)
    if isinstance(error, RequestCanceledError):
        return str(error)
    if isinstance(error, PackageError):
        return str(error) or type(error).__name__
    # Not a contract or package problem: say what broke for the operator.
    return f"internal error: {type(error).__name__}: {error}"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str)
    return _encodable(text[:_MAX_COPIED_CHARS])
