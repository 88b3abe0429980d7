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
from uuid import uuid4

from pydantic import ConfigDict, Field, StringConstraints

from mayfly.errors import (
    DeviceError,
    EventError,
    IntegrityError,
    InventoryError,
    PackageError,
    PackageNotFoundError,
    ParamsError,
    SigningKeyError,
    UnsafeArchiveError,
)
from mayfly.events._base import (
    COORDINATOR_SOURCE,
    TASK_REJECTED,
    EventModel,
    NonEmpty,
    Priority,
    is_valid_traceparent,
    validate_model,
)

__all__ = ["RejectionCode", "TaskRejected", "rejection_for"]

# Values copied from a bad event are capped so a hostile input cannot make
# its own rejection too large to publish.
_MAX_COPIED_CHARS = 1024
_MAX_REASON_CHARS = 4096
_PRIORITIES = frozenset(p.value for p in Priority)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class RejectionCode(StrEnum):
    """Why a request was rejected, for dashboards and alerts."""

    INVALID_EVENT = "invalid_event"
    UNKNOWN_TASK = "unknown_task"
    UNKNOWN_DEVICE = "unknown_device"
    INVALID_PARAMS = "invalid_params"
    INTEGRITY = "integrity"
    NOT_A_CLOUDEVENT = "not_a_cloudevent"
    INTERNAL = "internal"


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
    signature and archive errors are ``integrity``; anything else ``internal``.
    The trace context and priority of the original are carried over when valid.

    Args:
        error: what went wrong.
        raw_attributes: the offending event's attributes as far as known, e.g.
            :func:`~mayfly.events.peek_attributes` of the record or a decoded
            request's ``cloudevent_attributes()``.
        code: overrides the derived code.
        source: the rejecting component.
    """
    raw = dict(raw_attributes or {})
    original = {
        name: _text(value)
        for name, value in raw.items()
        if name not in ("data", "data_base64") and value is not None
    }
    raw_id = raw.get("id")
    request_id = _text(raw_id) if isinstance(raw_id, str) and raw_id else None
    field = error.field if isinstance(error, EventError | ParamsError) else None
    task = raw.get("tasktype")
    if isinstance(error, PackageError) and error.package:
        task = error.package
    traceparent = raw.get("traceparent")
    has_trace = is_valid_traceparent(traceparent)
    tracestate = raw.get("tracestate")
    priority = raw.get("priority")
    values = {
        # Deterministic when possible, so a redelivered bad request is rejected once.
        "id": f"{request_id}:rejected" if request_id and len(request_id) <= 256 else str(uuid4()),
        "source": source,
        "priority": priority
        if isinstance(priority, str) and priority in _PRIORITIES
        else Priority.NORMAL,
        "traceparent": traceparent if has_trace else None,
        "tracestate": _text(tracestate) if has_trace and isinstance(tracestate, str) else None,
        "request_id": request_id,
        "reason": _reason(error)[:_MAX_REASON_CHARS],
        "code": code if code is not None else _code(error, raw),
        "field": field,
        "task": _text(task) if isinstance(task, str) else None,
        "original": original,
    }
    return validate_model(TaskRejected, values)


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
    return RejectionCode.INTERNAL


def _reason(error: BaseException) -> str:
    if isinstance(error, EventError | ParamsError | InventoryError | DeviceError):
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
    return text[:_MAX_COPIED_CHARS]
