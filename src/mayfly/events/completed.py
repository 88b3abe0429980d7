"""``dev.mayfly.task.completed``: the result of one request, possibly in parts.

A fan-out over thousands of devices can outgrow Kafka's default 1 MiB record
limit, so :func:`split_completed` cuts a result by device into parts that
each fit, and :func:`merge_completed` puts them back together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from mayfly.errors import EventError
from mayfly.events._base import (
    COORDINATOR_SOURCE,
    MAX_EVENT_BYTES,
    TASK_COMPLETED,
    DeviceId,
    DeviceStatus,
    EventId,
    EventModel,
    Name,
    NonEmpty,
    OverallStatus,
    SemVer,
    UtcDatetime,
    contract_error,
)
from mayfly.events._reports import ReportOfRequest
from mayfly.events._wire import MAX_ATTRIBUTE_CHARS
from mayfly.events.requested import Shard

__all__ = [
    "DEFAULT_PART_BYTES",
    "MAX_DEVICE_LOG_LINES",
    "MAX_LOG_MESSAGE",
    "CoordinatorInfo",
    "DeviceResult",
    "LogLine",
    "PackageRef",
    "Part",
    "ShardRun",
    "TaskCompleted",
    "Timings",
    "merge_completed",
    "merge_shards",
    "split_completed",
]

#: Budget for one part's encoded ``data``: 10% under :data:`MAX_EVENT_BYTES`
#: leaves room for the envelope, headers and key under Kafka's 1 MiB default.
DEFAULT_PART_BYTES = 900_000

Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
Count = Annotated[int, Field(strict=True, ge=0)]


class _Value(BaseModel):
    # Results come from other Mayfly versions: unknown fields are ignored.
    model_config = ConfigDict(frozen=True, extra="ignore")


class PackageRef(_Value):
    """The exact package a request ran."""

    name: Name
    version: SemVer
    digest: Digest


#: Lines of package output one device keeps in its result, the latest.
MAX_DEVICE_LOG_LINES = 20
#: A kept line's message is cut to this many characters.
MAX_LOG_MESSAGE = 500
#: An abort's reason in a result is cut to this many characters.
MAX_ABORT_REASON = 500
LogLevel = Literal["debug", "info", "warning", "error", "critical", "progress"]


class LogLine(_Value):
    """One ``ctx.log`` record, or ``ctx.progress`` report (level ``progress``),
    of the package on a device."""

    at: UtcDatetime
    attempt: Count
    level: LogLevel
    message: Annotated[str, StringConstraints(max_length=MAX_LOG_MESSAGE)]
    percent: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )


class DeviceResult(_Value):
    """What happened on one device."""

    device_id: DeviceId
    status: DeviceStatus
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    attempts: Count = 0
    output: JsonValue = None
    error: str | None = None
    logs: Annotated[tuple[LogLine, ...], Field(max_length=MAX_DEVICE_LOG_LINES)] = Field(
        default=(), exclude_if=lambda v: not v
    )
    """The package's last lines on this device, over every attempt (bounded)."""
    logs_dropped: Count = Field(default=0, exclude_if=lambda v: not v)
    """Lines it wrote that are not kept: older ones, or over the request's budget."""


class Timings(_Value):
    """When the request was published, and when the coordinator received,
    started and finished it. ``published_at`` (the request event's ``time``)
    lets a trace span the request's whole life, queueing included."""

    published_at: UtcDatetime | None = None
    received_at: UtcDatetime
    started_at: UtcDatetime
    finished_at: UtcDatetime
    cold_start_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None


class CoordinatorInfo(_Value):
    """Which coordinator instance ran the request."""

    id: NonEmpty
    host: NonEmpty
    pid: Count
    #: How it was started: ``knative``, ``job``, ``local``...
    mode: NonEmpty


class Part(_Value):
    """Position of this event among the parts of one split result."""

    index: Count = 0
    count: Annotated[int, Field(strict=True, ge=1)] = 1

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        if self.index >= self.count:
            raise contract_error("data.part.index", f"{self.index} is not below count {self.count}")
        return self


class ShardRun(_Value):
    """How one shard of a merged result ran: its coordinator, times and status,
    and how many of the result's devices (the next ones, in order) were its."""

    index: Count
    status: OverallStatus
    devices: Count
    timings: Timings
    coordinator: CoordinatorInfo


class TaskCompleted(ReportOfRequest, EventModel):
    """The result of a request (or one part of it).

    The event id is ``<request_id>:completed:<part index>`` so redelivered
    parts deduplicate, and the partition key is the request id so all parts
    of one result land on one partition.
    """

    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[str] = TASK_COMPLETED
    attribute_fields: ClassVar[dict[str, str]] = {
        "source": "source",
        "time": "time",
        "priority": "priority",
        "traceparent": "traceparent",
        "tracestate": "tracestate",
    }
    strict_data: ClassVar[bool] = False
    report_name: ClassVar[str] = "result"

    source: NonEmpty = COORDINATOR_SOURCE
    request_id: EventId
    request_source: str | None = Field(default=None, max_length=MAX_ATTRIBUTE_CHARS)
    """The request's CloudEvent source: with ``request_id``, which request this
    is the result of (absent from older results: then the id alone)."""
    task: Name
    package: PackageRef
    status: OverallStatus
    devices: tuple[DeviceResult, ...] = ()
    timings: Timings
    coordinator: CoordinatorInfo
    part: Part = Part()
    shard: Shard | None = Field(default=None, exclude_if=lambda v: v is None)
    """Set when this is the result of one shard of a larger request."""
    shards: tuple[ShardRun, ...] = Field(default=(), exclude_if=lambda v: not v)
    """In a result merged from shards (the aggregator's), each shard's run."""
    aborted: str | None = Field(
        default=None, max_length=MAX_ABORT_REASON, exclude_if=lambda v: v is None
    )
    """Why the rollout stopped itself (its ``rollout.abort`` was met), if it did."""

    @property
    def id(self) -> str:
        """The CloudEvent id: ``<request_id>:completed:<part index>``."""
        return f"{self.request_id}:completed:{self.part.index}"

    @model_validator(mode="after")
    def _same_package(self) -> Self:
        if self.package.name != self.task:
            raise contract_error(
                "data.package.name", f"{self.package.name!r} is not the task {self.task!r}"
            )
        if self.shards and (
            self.shard is not None or sum(r.devices for r in self.shards) != len(self.devices)
        ):
            raise contract_error(
                "data.shards", "a merged result's shards account for its devices, and no more"
            )
        return self


_DEVICE_JSON = TypeAdapter(DeviceResult)
# Fields every part of one result repeats; ``time`` may differ if parts were
# published separately, and is taken from the first part.
_SHARED_FIELDS = tuple(
    name for name in TaskCompleted.model_fields if name not in ("devices", "part", "time")
)


def split_completed(
    result: TaskCompleted, max_event_bytes: int = DEFAULT_PART_BYTES
) -> tuple[TaskCompleted, ...]:
    """Split a result by device into parts whose encoded data fits a budget.

    Devices keep their order; parts share every request-level field and are
    numbered by ``part.index`` out of ``part.count``. A result that fits comes
    back as one part.

    Args:
        result: a whole result (``part.count == 1``).
        max_event_bytes: budget for each part's encoded ``data`` in bytes; at
            most :data:`MAX_EVENT_BYTES`.

    Raises:
        EventError: if ``result`` is already a part, or one device's result
            alone exceeds the budget (cap the output at the source).
    """
    if result.part.count != 1:
        raise EventError("data.part", "is already one part of a split result")
    if not 0 < max_event_bytes <= MAX_EVENT_BYTES:
        raise ValueError(f"max_event_bytes must be in 1..{MAX_EVENT_BYTES}")
    devices = result.devices
    # Size of the data with no devices and the widest part numbers possible,
    # so each part's real size can only be smaller than the estimate.
    widest = Part(index=max(len(devices) - 1, 0), count=max(len(devices), 1))
    base = len(result.model_copy(update={"devices": (), "part": widest}).data_json())
    chunks: list[tuple[DeviceResult, ...]] = []
    start, size = 0, base
    for index, device in enumerate(devices):
        # One comma per device past the first in a part; counting it always
        # over-estimates by at most one byte.
        item = len(_DEVICE_JSON.dump_json(device)) + 1
        if base + item > max_event_bytes:
            raise EventError(
                f"data.devices.{index}",
                f"the result of device {device.device_id!r} alone encodes to {item} bytes,"
                f" over the {max_event_bytes}-byte budget of one event; cap its output",
            )
        if size + item > max_event_bytes:
            chunks.append(devices[start:index])
            start, size = index, base
        size += item
    chunks.append(devices[start:])
    if len(chunks) == 1:
        return (result,)
    count = len(chunks)
    return tuple(
        result.model_copy(update={"devices": chunk, "part": Part(index=i, count=count)})
        for i, chunk in enumerate(chunks)
    )


def merge_completed(parts: Iterable[TaskCompleted]) -> TaskCompleted:
    """Reassemble the parts of one result, in any order.

    Redelivered duplicates of a part are tolerated when identical.

    Raises:
        EventError: when there are no parts, parts belong to different
            requests or disagree on request-level fields, or parts are missing.
    """
    received = list(parts)
    if not received:
        raise EventError("data.part", "no parts to merge")
    first = received[0]
    count = first.part.count
    by_index: dict[int, TaskCompleted] = {}
    for part in received:
        if part.request_id != first.request_id:
            raise EventError(
                "data.request_id",
                f"part of request {part.request_id!r} mixed with parts of {first.request_id!r}",
            )
        if part.part.count != count:
            raise EventError(
                "data.part.count", f"parts disagree on the count: {part.part.count} and {count}"
            )
        for name in _SHARED_FIELDS:
            if getattr(part, name) != getattr(first, name):
                raise EventError(
                    TaskCompleted.wire_name(name),
                    f"differs between parts of request {first.request_id!r}",
                )
        seen = by_index.setdefault(part.part.index, part)
        if seen is not part and seen != part:
            raise EventError(
                "data.part.index", f"part {part.part.index} received twice with different devices"
            )
    missing = [index for index in range(count) if index not in by_index]
    if missing:
        raise EventError(
            "data.part",
            f"missing part(s) {missing} of {count} for request {first.request_id!r}",
        )
    devices = tuple(device for index in range(count) for device in by_index[index].devices)
    return first.model_copy(update={"devices": devices, "part": Part()})


# What shards of one request share; the rest (devices, coordinator, timings,
# status) is each shard's own.
_SHARD_SHARED = ("source", "request_source", "task", "package", "priority", "traceparent")


def merge_shards(shards: Iterable[TaskCompleted]) -> TaskCompleted:
    """Put the (whole) results of every shard of one request together, in any order.

    The merged result is the request's: its id, the devices of every shard in
    shard order, received and started at the first shard's, finished at the
    last's, ``succeeded`` or ``failed`` when every shard was, ``canceled`` when
    one was, else ``partial``; ``shards`` says how each shard ran.

    Raises:
        EventError: no shards, shards of different requests or that disagree on
            what they share (the package, say), or shards missing.
    """
    received = {s.shard.index: s for s in shards if s.shard is not None}
    first = next(iter(received.values()), None)
    if first is None or first.shard is None:
        raise EventError("data.shard", "no shards to merge")
    of, count = first.shard.of, first.shard.count
    for result in received.values():
        assert result.shard is not None
        if (result.shard.of, result.shard.count) != (of, count):
            raise EventError("data.shard", f"a shard of {result.shard.of!r} mixed with {of!r}'s")
        if result.part.count != 1:
            raise EventError("data.part", "merge the parts of a shard's result first")
        for name in _SHARD_SHARED:
            if getattr(result, name) != getattr(first, name):
                raise EventError(
                    TaskCompleted.wire_name(name), f"differs between shards of request {of!r}"
                )
    missing = [index for index in range(count) if index not in received]
    if missing:
        raise EventError("data.shard", f"missing shard(s) {missing} of {count} of request {of!r}")
    ordered = [received[index] for index in range(count)]
    statuses = {s.status for s in ordered}
    if OverallStatus.CANCELED in statuses:
        status = OverallStatus.CANCELED
    elif len(statuses) == 1:
        status = first.status
    else:
        status = OverallStatus.PARTIAL
    cold = [s.timings.cold_start_ms for s in ordered if s.timings.cold_start_ms is not None]
    timings = Timings(
        published_at=first.timings.published_at,
        received_at=min(s.timings.received_at for s in ordered),
        started_at=min(s.timings.started_at for s in ordered),
        finished_at=max(s.timings.finished_at for s in ordered),
        cold_start_ms=min(cold) if cold else None,
    )
    runs = tuple(
        ShardRun(
            index=index,
            status=s.status,
            devices=len(s.devices),
            timings=s.timings,
            coordinator=s.coordinator,
        )
        for index, s in enumerate(ordered)
    )
    aborted = next((s.aborted for s in ordered if s.aborted), None)
    return first.model_copy(
        update={
            "aborted": aborted,
            "request_id": of,
            "status": status,
            "devices": tuple(d for s in ordered for d in s.devices),
            "timings": timings,
            "coordinator": ordered[0].coordinator,
            "shard": None,
            "shards": runs,
        }
    )
