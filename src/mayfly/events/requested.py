"""``dev.mayfly.task.requested``: what an operator asks Mayfly to do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, model_validator

from mayfly.events._base import (
    PUBLISHER_SOURCE,
    TASK_REQUESTED,
    DeviceId,
    EventId,
    EventModel,
    Name,
    NonEmpty,
    Priority,
    SemVer,
    UtcDatetime,
    contract_error,
    validate_model,
)

__all__ = ["DEFAULT_CHANNEL", "Rollout", "TaskRequest", "new_request", "partition_key_for"]

#: The channel a request runs when it names neither a version nor a channel.
DEFAULT_CHANNEL = "stable"

PartitionKey = Annotated[str, StringConstraints(min_length=1, max_length=256)]


def partition_key_for(
    request_id: str,
    devices: Sequence[str] = (),
    selector: Mapping[str, str] | None = None,
    *,
    explicit: str | None = None,
) -> str:
    """Choose the Kafka partition key of a request.

    Rules, in order:

    1. an explicit key given by the publisher wins;
    2. exactly one device id and no selector: that device id, so one device's
       tasks land on one partition and run in publish order;
    3. otherwise the request id: a fan-out has no single device to order by,
       and the id spreads requests evenly over partitions.

    Args:
        request_id: the request's CloudEvent id.
        devices: the request's device ids.
        selector: the request's label selector, if any.
        explicit: a key the publisher chose.
    """
    if explicit:
        return explicit
    if len(devices) == 1 and not selector:
        return devices[0]
    return request_id


class Rollout(BaseModel):
    """How a request spreads over its devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Devices run at once; None lets the package's limit decide.
    max_parallel: Annotated[int, Field(strict=True, ge=1)] | None = None
    #: Share of failed devices (0..1) after which the rest are skipped.
    max_failure_ratio: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None


class TaskRequest(EventModel):
    """A request to run task ``task`` against devices.

    ``id`` is the CloudEvent id and the idempotency key: a redelivered request
    has the same id, and devices see it as their ``Idempotency-Key``.
    """

    event_type: ClassVar[str] = TASK_REQUESTED
    attribute_fields: ClassVar[dict[str, str]] = {
        "id": "id",
        "source": "source",
        "time": "time",
        "priority": "priority",
        "partitionkey": "partition_key",
        "traceparent": "traceparent",
        "tracestate": "tracestate",
    }

    id: EventId
    source: NonEmpty = PUBLISHER_SOURCE
    partition_key: PartitionKey
    task: Name
    version: SemVer | None = None
    channel: Name | None = None
    devices: tuple[DeviceId, ...] = ()
    selector: dict[NonEmpty, str] = Field(default_factory=dict)
    params: dict[str, JsonValue] = Field(default_factory=dict)
    deadline: UtcDatetime | None = None
    rollout: Rollout | None = None

    @property
    def tasktype(self) -> str:
        """The ``tasktype`` extension: the task name, for Trigger filters."""
        return self.task

    def _ce_id(self) -> str:
        return self.id

    def _ce_partition_key(self) -> str:
        return self.partition_key

    def _ce_tasktype(self) -> str:
        return self.task

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("version") is None and data.get("channel") is None:
            data["channel"] = DEFAULT_CHANNEL
        if data.get("partition_key") is None:
            data["partition_key"] = _default_partition_key(data)
        return data

    @model_validator(mode="after")
    def _targets(self) -> Self:
        if self.version is not None and self.channel is not None:
            raise contract_error("data.version", "give data.version or data.channel, not both")
        if not self.devices and not self.selector:
            raise contract_error(
                "data.devices",
                "no target devices: give device ids in data.devices and/or a label selector"
                " in data.selector",
            )
        if len(set(self.devices)) != len(self.devices):
            seen: set[str] = set()
            for index, device in enumerate(self.devices):
                if device in seen:
                    raise contract_error(f"data.devices.{index}", f"duplicate device id {device!r}")
                seen.add(device)
        return self


def _default_partition_key(data: Mapping[str, Any]) -> Any:
    # Runs before field validation, so it only trusts well-formed input and
    # otherwise falls back to the id (whose own error is then reported).
    devices, selector, request_id = data.get("devices"), data.get("selector"), data.get("id")
    if (
        isinstance(devices, list | tuple)
        and len(devices) == 1
        and isinstance(devices[0], str)
        and 0 < len(devices[0]) <= 256
        and (selector is None or isinstance(selector, Mapping))
        and isinstance(request_id, str)
    ):
        return partition_key_for(request_id, devices, selector)
    return request_id


def new_request(
    task: str,
    *,
    devices: Iterable[str] = (),
    selector: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    version: str | None = None,
    channel: str | None = None,
    priority: Priority | str = Priority.NORMAL,
    source: str = PUBLISHER_SOURCE,
    traceparent: str | None = None,
    tracestate: str | None = None,
    deadline: datetime | None = None,
    rollout: Rollout | Mapping[str, Any] | None = None,
    request_id: str | None = None,
    partition_key: str | None = None,
) -> TaskRequest:
    """Build a valid request with a fresh uuid4 id and the current UTC time.

    The partition key follows :func:`partition_key_for` unless given.

    Raises:
        EventError: when any argument breaks the contract; ``field`` names it
            by its wire name (``data.devices``, ``priority``...).
    """
    values: dict[str, Any] = {
        "id": request_id if request_id is not None else str(uuid4()),
        "source": source,
        "time": datetime.now(UTC),
        "priority": priority,
        "partition_key": partition_key,
        "traceparent": traceparent,
        "tracestate": tracestate,
        "task": task,
        "version": version,
        "channel": channel,
        # A bare string is left as is so validation refuses it instead of
        # treating each character as a device id.
        "devices": devices if isinstance(devices, str) else tuple(devices),
        "selector": dict(selector) if selector is not None else {},
        "params": dict(params) if params is not None else {},
        "deadline": deadline,
        "rollout": dict(rollout) if isinstance(rollout, Mapping) else rollout,
    }
    return validate_model(TaskRequest, values)
