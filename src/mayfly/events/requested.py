"""``dev.mayfly.task.requested``: what an operator asks Mayfly to do."""

from __future__ import annotations

import functools
import hashlib
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self
from uuid import UUID, uuid4, uuid5

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

__all__ = [
    "DEFAULT_CHANNEL",
    "MAX_SHARDS",
    "MAX_WAVES",
    "SHARD_MARK",
    "Abort",
    "Continuous",
    "Ramp",
    "Rollback",
    "Rollout",
    "Schedule",
    "Shard",
    "TaskRequest",
    "Window",
    "new_request",
    "partition_key_for",
    "rollback_requests",
    "shard_prefixes",
    "shard_request",
]

#: The channel a request runs when it names neither a version nor a channel.
DEFAULT_CHANNEL = "stable"
#: Shards one request becomes at most, whatever its shard size: each is an event
#: and a coordinator, and the aggregator holds a request's shards until all are in.
MAX_SHARDS = 1000

PartitionKey = Annotated[str, StringConstraints(min_length=1, max_length=256)]
#: A site, a tenant: what the runtime shares coordinators fairly between,
#: inside a task type. An extension attribute, so the runtime reads it
#: without decoding the request.
FairnessKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:/@-]{1,128}$")]


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


class Abort(BaseModel):
    """When a rollout stops itself: once at least ``min_devices`` devices ran
    (in one coordinator) and ``threshold_pct`` percent of them ended with
    ``outcome`` (``failed``, ``timed_out``, or ``any`` outcome but success)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    outcome: Literal["failed", "timed_out", "any"] = "any"
    threshold_pct: Annotated[float, Field(strict=False, gt=0.0, le=100.0, allow_inf_nan=False)]
    min_devices: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] = 1


#: Waves one rollout lists at most.
MAX_WAVES = 100
#: A pace is at most this many device starts a minute (a thousand a second).
MAX_PER_MINUTE = 60_000.0
#: At least one device start in 100 minutes: a slower pace is a schedule.
MIN_PER_MINUTE = 0.01

PerMinute = Annotated[
    float, Field(strict=False, ge=MIN_PER_MINUTE, le=MAX_PER_MINUTE, allow_inf_nan=False)
]
#: A wave: a number of devices, or a share of the request's (``"10%"``).
Wave = (
    Annotated[int, Field(strict=True, ge=1, le=10_000_000)]
    | Annotated[str, StringConstraints(pattern=r"^[0-9]{1,3}(\.[0-9]{1,2})?%$")]
)


class Ramp(BaseModel):
    """An exponential pace: ``base_per_minute`` device starts a minute at
    first, multiplied by ``increment_factor`` after every ``increase_after``
    devices that succeeded, up to ``max_per_minute``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_per_minute: PerMinute
    # At least 1.01: a ramp reaches the highest pace in a bounded number of steps.
    increment_factor: Annotated[
        float, Field(strict=False, ge=1.01, le=10.0, allow_inf_nan=False)
    ] = 2.0
    increase_after: Annotated[int, Field(strict=True, ge=1, le=1_000_000)]
    max_per_minute: PerMinute | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _max_above_base(self) -> Self:
        if self.max_per_minute is not None and self.max_per_minute < self.base_per_minute:
            raise contract_error(
                "data.rollout.ramp.max_per_minute",
                f"{self.max_per_minute:g} is below base_per_minute {self.base_per_minute:g}",
            )
        return self


class Rollback(BaseModel):
    """What runs, once a rollout aborted, on the devices it had changed: a
    request of its own, for ``task`` (at ``version``, else its stable channel)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: Name
    version: SemVer | None = None
    params: dict[str, JsonValue] = Field(default_factory=dict)


#: Maintenance windows one schedule lists at most.
MAX_WINDOWS = 50
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
#: A wall-clock time of day, ``HH:MM`` or ``HH:MM:SS`` (24 h).
ClockTime = Annotated[
    str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9])?$")
]


class Window(BaseModel):
    """A recurring maintenance window: on ``days`` (every day when none are
    given), from ``start`` to ``end``, wall-clock times in the schedule's time
    zone. An ``end`` at or before ``start`` ends the next day (``22:00`` to
    ``02:00``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Seven at most: every day is looked up in it, for every window, each time.
    days: Annotated[tuple[Day, ...], Field(max_length=7)] = (
        "mon", "tue", "wed", "thu", "fri", "sat", "sun",
    )  # fmt: skip
    start: ClockTime
    end: ClockTime

    @model_validator(mode="after")
    def _some_time(self) -> Self:
        if not self.days:
            raise contract_error("data.rollout.schedule.windows", "a window needs a day")
        if len(set(self.days)) != len(self.days):
            raise contract_error("data.rollout.schedule.windows", "a window names a day twice")
        if _seconds_of(self.start) == _seconds_of(self.end):
            raise contract_error(
                "data.rollout.schedule.windows", f"a window from {self.start} to itself is empty"
            )
        return self


def _seconds_of(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return parts[0] * 3600 + parts[1] * 60 + (parts[2] if len(parts) > 2 else 0)


class Schedule(BaseModel):
    """When a rollout's devices may start: not before ``not_before``, not
    after ``not_after`` (then, by ``at_end``, the devices not started are
    skipped, ``stop``, or the running ones are canceled too, ``cancel``), and
    only inside one of ``windows`` when there are any (a device running at a
    window's end finishes; the rest wait for the next window)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    not_before: UtcDatetime | None = Field(default=None, exclude_if=lambda v: v is None)
    not_after: UtcDatetime | None = Field(default=None, exclude_if=lambda v: v is None)
    at_end: Literal["stop", "cancel"] = "stop"
    windows: Annotated[tuple[Window, ...], Field(max_length=MAX_WINDOWS)] = ()
    #: The IANA time zone of the windows' times (``Europe/Paris``).
    time_zone: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "UTC"

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.not_before is None and self.not_after is None and not self.windows:
            raise contract_error("data.rollout.schedule", "give not_before, not_after or windows")
        if (
            self.not_before is not None
            and self.not_after is not None
            and self.not_after <= self.not_before
        ):
            raise contract_error(
                "data.rollout.schedule.not_after", "not_after must be later than not_before"
            )
        if self.time_zone not in _time_zones():
            raise contract_error(
                "data.rollout.schedule.time_zone",
                f"{self.time_zone!r} is not an IANA time zone (Europe/Paris, UTC)",
            )
        return self


@functools.cache
def _time_zones() -> frozenset[str]:
    """The IANA time zone names (read once): a name is checked against these,
    never opened as a path (``Europe``, a folder, is no zone)."""
    return frozenset(zoneinfo.available_timezones())


class Continuous(BaseModel):
    """A request that goes on reaching the devices that match its selector
    later: its targets are resolved again every ``every_s`` seconds (within
    its schedule, until its ``not_after`` or a cancel)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    every_s: Annotated[int, Field(strict=True, ge=1, le=86_400)] = 60


class Rollout(BaseModel):
    """How a request spreads over its devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Devices run at once; None lets the package's limit decide.
    max_parallel: Annotated[int, Field(strict=True, ge=1)] | None = None
    #: Share of failed devices (0..1) after which the rest are skipped.
    max_failure_ratio: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None
    #: Devices one coordinator runs at most: a request over more is run in
    #: shards; None lets the runtime's setting decide.
    shard_size: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    #: When the rollout stops itself (every shard of it, and what has not started).
    abort: Abort | None = Field(default=None, exclude_if=lambda v: v is None)
    #: What runs on the devices already changed once it aborted.
    on_abort: Rollback | None = Field(default=None, exclude_if=lambda v: v is None)
    #: Devices started a minute at most, over the whole request (its shards share it).
    rate_per_minute: PerMinute | None = Field(default=None, exclude_if=lambda v: v is None)
    #: A pace that grows as devices succeed (instead of ``rate_per_minute``).
    ramp: Ramp | None = Field(default=None, exclude_if=lambda v: v is None)
    #: Devices in waves: each starts once every device of the one before ended
    #: (and the abort criteria held); devices past the last listed wave are one
    #: more wave.
    waves: Annotated[tuple[Wave, ...], Field(min_length=1, max_length=MAX_WAVES)] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    #: When devices may start: a start and an end, maintenance windows.
    schedule: Schedule | None = Field(default=None, exclude_if=lambda v: v is None)
    #: Devices that match the selector later get the task too (``true``: every 60 s).
    continuous: Continuous | None = Field(default=None, exclude_if=lambda v: v is None)

    @model_validator(mode="before")
    @classmethod
    def _continuous_flag(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("continuous"), bool):
            data = dict(data)
            data["continuous"] = {} if data["continuous"] else None
        return data

    @model_validator(mode="after")
    def _one_pace(self) -> Self:
        if self.rate_per_minute is not None and self.ramp is not None:
            raise contract_error(
                "data.rollout.ramp", "give data.rollout.rate_per_minute or a ramp, not both"
            )
        for index, wave in enumerate(self.waves or ()):
            if isinstance(wave, str) and not 0.0 < float(wave[:-1]) <= 100.0:
                raise contract_error(
                    f"data.rollout.waves.{index}",
                    f"{wave!r} is not a share above 0 % and up to 100 %",
                )
        return self

    @property
    def paced(self) -> bool:
        """Whether devices start by a pace or in waves (a rollout that takes time)."""
        return self.rate_per_minute is not None or self.ramp is not None or bool(self.waves)

    @property
    def resumable(self) -> bool:
        """Whether a later coordinator may go on with it where an earlier one
        ended (paced, or scheduled: it checkpoints the devices that ended)."""
        return self.paced or self.schedule is not None or self.continuous is not None


class Shard(BaseModel):
    """Which part of a larger request a request is: shard ``index`` of ``count``
    of request ``of`` (same source). Its devices are the shard's own."""

    # Results carry it too, and results from later versions are read: a field
    # added later is ignored, not a broken result.
    model_config = ConfigDict(frozen=True, extra="ignore")

    of: EventId
    index: Annotated[int, Field(strict=True, ge=0)]
    count: Annotated[int, Field(strict=True, ge=2, le=MAX_SHARDS)]

    @model_validator(mode="after")
    def _in_range(self) -> Self:
        if self.index >= self.count:
            raise contract_error(
                "data.shard.index", f"{self.index} is not below count {self.count}"
            )
        return self


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
        "fairnesskey": "fairness_key",
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
    # Left out when unset (as is shard_size), so that what every request
    # carried before shards still reads in a coordinator from before them.
    shard: Shard | None = Field(default=None, exclude_if=lambda v: v is None)
    #: The share of coordinators it counts toward inside its task type.
    fairness_key: FairnessKey | None = None

    @property
    def root_id(self) -> str:
        """The id of the request as published: a shard's ``of``, else its own. The
        devices' idempotency keys and the task code see this one."""
        return self.shard.of if self.shard is not None else self.id

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

    def _ce_extensions(self) -> dict[str, str]:
        return {} if self.fairness_key is None else {"fairnesskey": self.fairness_key}

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
        if self.shard is not None and (self.selector or not self.devices):
            raise contract_error("data.shard", "a shard names its devices, and no selector")
        if self.rollout is not None and self.rollout.continuous is not None and not self.selector:
            raise contract_error(
                "data.rollout.continuous",
                "a continuous request reaches devices that match its data.selector later: give one",
            )
        if self.shard is not None and self.id != _shard_id(self.shard.of, self.shard.index):
            raise contract_error(
                "id", f"a shard's id is {_shard_id(self.shard.of, self.shard.index)!r}"
            )
        if self.shard is None and SHARD_MARK in self.id:
            raise contract_error("id", f"{SHARD_MARK!r} in an id is kept for shards")
        if len(set(self.devices)) != len(self.devices):
            seen: set[str] = set()
            for index, device in enumerate(self.devices):
                if device in seen:
                    raise contract_error(f"data.devices.{index}", f"duplicate device id {device!r}")
                seen.add(device)
        return self


#: What a shard's id carries between its request's id and its index.
SHARD_MARK = "#shard-"
#: Budget of one shard's device ids, encoded: a shard is one event, under
#: Kafka's 1 MiB record with room for everything else it carries.
_SHARD_DEVICE_BYTES = 600_000


def _shard_id(of: str, index: int) -> str:
    suffix = f"{SHARD_MARK}{index}"
    if len(of) + len(suffix) > 256:  # an event id's limit: a long id is shortened
        of = _shortened(of)
    return of + suffix


def _shortened(of: str) -> str:
    return "sha256-" + hashlib.sha256(of.encode()).hexdigest()


def shard_prefixes(of: str) -> tuple[str, str]:
    """What the ids of request ``of``'s shards start with, before their index:
    ``<of>#shard-``, or the shortened form a long id takes. How a shard's
    rejection, which names only its own id, is traced back to its request."""
    return of + SHARD_MARK, _shortened(of) + SHARD_MARK


def shard_request(
    request: TaskRequest, devices: Sequence[str], shard_size: int, *, version: str
) -> tuple[TaskRequest, ...]:
    """Cut a request into shards of at most ``shard_size`` devices (more when
    that would make over :data:`MAX_SHARDS`), each an event of its own.

    Shards are also made small enough to be one event each (their device ids
    under 600 kB encoded), even past ``max_parallel``.

    Every shard keeps the request's source, time, priority, trace context,
    params and deadline, and runs ``version`` (the one the request resolved
    to: a channel moved meanwhile does not split a request over two
    versions). Devices keep their order; shard sizes differ by one at most.
    The rollout is split: ``max_parallel`` is shared out so the shards
    together run no more devices at once than the request allows (so there
    are at most ``max_parallel`` shards), and ``max_failure_ratio`` applies
    within each shard. Each shard's partition key is its own id, so shards
    spread over partitions, runtimes and pods.

    Returns:
        The shards; the request itself, alone, when it is not over the size.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    count = min(-(-len(devices) // shard_size), MAX_SHARDS)
    rollout = request.rollout or Rollout()
    if rollout.max_parallel is not None:
        count = min(count, rollout.max_parallel)
    # Long ids make more shards, so each still fits one event (quote, quote, comma).
    encoded = sum(len(device.encode()) + 3 for device in devices)
    count = max(count, min(-(-encoded // _SHARD_DEVICE_BYTES), MAX_SHARDS))
    if request.shard is not None or count < 2:
        return (request,)
    base, extra = divmod(len(devices), count)
    shards: list[TaskRequest] = []
    start = 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        parallel = None
        if rollout.max_parallel is not None:
            share, left = divmod(rollout.max_parallel, count)
            parallel = max(1, share + (1 if index < left else 0))
        shard_id = _shard_id(request.id, index)
        shards.append(
            request.model_copy(
                update={
                    "id": shard_id,
                    "partition_key": shard_id,
                    "version": version,
                    "channel": None,
                    "devices": tuple(devices[start:end]),
                    "selector": {},
                    "rollout": rollout.model_copy(
                        update={"max_parallel": parallel, "shard_size": None}
                    ),
                    "shard": Shard(of=request.id, index=index, count=count),
                }
            )
        )
        start = end
    return tuple(shards)


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
    fairness_key: str | None = None,
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
        "fairness_key": fairness_key,
    }
    return validate_model(TaskRequest, values)


#: Rollback requests' ids derive from their rollout's (source and id) in this namespace.
_ROLLBACK_NAMESPACE = UUID("3d1c9a4e-7b2f-4f5e-9c8a-6e0b1d2f3a47")


def rollback_requests(
    request: TaskRequest, rollback: Rollback, devices: Sequence[str]
) -> tuple[TaskRequest, ...]:
    """The requests that undo an aborted rollout on the ``devices`` it changed:
    ``rollback``'s task, version and params, the rollout's priority and trace;
    as many as it takes for each to be one event (device ids under 600 kB).
    Their ids derive from the rollout's (a shard's: its own), so publishing
    them again makes the same requests."""
    chunks: list[list[str]] = [[]]
    size = 0
    for device in devices:
        cost = len(device.encode()) + 3  # quote, quote, comma
        if chunks[-1] and size + cost > _SHARD_DEVICE_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(device)
        size += cost
    return tuple(
        new_request(
            rollback.task,
            devices=chunk,
            params=rollback.params,
            version=rollback.version,
            priority=request.priority,
            source=request.source,
            traceparent=request.traceparent,
            tracestate=request.tracestate,
            fairness_key=request.fairness_key,
            request_id=str(uuid5(_ROLLBACK_NAMESPACE, f"{request.source}\n{request.id}\n{index}")),
        )
        for index, chunk in enumerate(chunks)
        if chunk
    )
