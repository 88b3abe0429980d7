"""``dev.mayfly.task.progress``: how a running request stands, while it runs.

A coordinator in ``mayfly up`` emits one at most every half second while a
request that has run that long goes on, on the results topic and the
request's partition, so it comes before the result. Each carries the counts
of devices per status so far (the whole of the request or shard) and the
latest word of the devices that changed since the last one (at most
:data:`MAX_PROGRESS_DEVICES`: a later event has the rest), and the lines the
package wrote since (the latest :data:`MAX_PROGRESS_LINES`). They are news, not
a record: the result is the outcome, and a reader that missed one loses
nothing the next or the result does not say.

A paced rollout's also carry, in ``ended``, the whole result of each device
that ended since the last (every one, over as many events as they take): its
checkpoint. A coordinator that picks the request up after one died reads them
back and runs only the rest.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mayfly.events._base import (
    COORDINATOR_SOURCE,
    TASK_PROGRESS,
    DeviceId,
    DeviceStatus,
    EventId,
    EventModel,
    Name,
    NonEmpty,
    UtcDatetime,
)
from mayfly.events._reports import ReportOfRequest
from mayfly.events.completed import DeviceResult, LogLine
from mayfly.events.requested import Shard

__all__ = [
    "MAX_CHECKPOINT_BYTES",
    "MAX_PROGRESS_DEVICES",
    "MAX_PROGRESS_LINES",
    "MAX_PROGRESS_MESSAGE",
    "DeviceLine",
    "DeviceUpdate",
    "TaskProgress",
]

#: Device updates one progress event carries at most.
MAX_PROGRESS_DEVICES = 200
#: Encoded device results one progress event's ``ended`` carries at most (a
#: result is at most ~80 kB: the event stays well under a 1 MiB record).
MAX_CHECKPOINT_BYTES = 400_000
#: Package lines (``ctx.log``) one progress event carries at most, the latest.
MAX_PROGRESS_LINES = 50
#: A device's progress message is cut to this many characters (a package writes it).
MAX_PROGRESS_MESSAGE = 200

Count = Annotated[int, Field(strict=True, ge=0)]


class DeviceUpdate(BaseModel):
    """The latest word of one device."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    device_id: DeviceId
    status: DeviceStatus
    percent: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] = 0.0
    message: Annotated[str, StringConstraints(max_length=MAX_PROGRESS_MESSAGE)] = ""
    attempt: Count = 0


class DeviceLine(LogLine):
    """A line the package wrote on a device, as news."""

    device_id: DeviceId


class TaskProgress(ReportOfRequest, EventModel):
    """One report of a running request (or shard), by the coordinator running it.

    The event id is ``<request_id>:progress:<coordinator>:<seq>``: a request run
    again after a crash reports afresh under its new coordinator.
    """

    model_config = ConfigDict(extra="ignore")
    event_type: ClassVar[str] = TASK_PROGRESS
    attribute_fields: ClassVar[dict[str, str]] = {
        "source": "source",
        "time": "time",
        "priority": "priority",
        "traceparent": "traceparent",
        "tracestate": "tracestate",
    }
    strict_data: ClassVar[bool] = False
    report_name: ClassVar[str] = "report"

    source: NonEmpty = COORDINATOR_SOURCE
    request_id: EventId
    task: Name
    coordinator: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    seq: Count
    started_at: UtcDatetime
    devices_total: Count
    counts: dict[DeviceStatus, Count] = Field(default_factory=dict)
    """Devices per status so far, over every device of the request (or shard)."""
    devices: Annotated[tuple[DeviceUpdate, ...], Field(max_length=MAX_PROGRESS_DEVICES)] = ()
    logs: Annotated[tuple[DeviceLine, ...], Field(max_length=MAX_PROGRESS_LINES)] = Field(
        default=(), exclude_if=lambda v: not v
    )
    """The package's lines since the last report (the latest, when there were more)."""
    ended: Annotated[tuple[DeviceResult, ...], Field(max_length=MAX_PROGRESS_DEVICES)] = Field(
        default=(), exclude_if=lambda v: not v
    )
    """A paced rollout's checkpoint: the results of the devices that ended since
    the last report."""
    shard: Shard | None = Field(default=None, exclude_if=lambda v: v is None)

    @property
    def id(self) -> str:
        return f"{self.request_id}:progress:{self.coordinator}:{self.seq}"

    @property
    def done(self) -> int:
        """Devices that reached an end (succeeded, failed, timed out, skipped, canceled)."""
        ongoing = (DeviceStatus.QUEUED, DeviceStatus.RUNNING)
        return sum(n for status, n in self.counts.items() if status not in ongoing)
