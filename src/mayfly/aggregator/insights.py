"""Fleet insights from archived results: pure computations, no I/O.

:func:`compute_insights` reads archived events (results and rejections, in
any order) once and returns:

- per task type and package version: requests by outcome (succeeded,
  partial, failed, canceled; rejections, which ran no version, on a row of
  their own), devices run, request and device success rates, the device
  failures the package caused, p50/p95 request duration, p50 cold start, and
  the ids of the requests behind each bad number;
- per device: executions, success rate, non-success outcomes by status, p50
  duration, last error and its request; worst first (lowest success rate,
  most failures, slowest), cut to the top N. Only what the device can be
  blamed for counts against it (:func:`failure_kind`): a package that
  cannot load, raises or dies fails every device it runs on, and says so in
  its task row, not in the devices' ranking;
- rejections by reason (task, code, reason), with their request ids;
- time buckets of request latency (p50/p95) and success rate, for plots.

Definitions, shared with the traces (:mod:`mayfly.aggregator.windows`): a
request's duration runs from its publication (else receipt) to its finish; a
device execution is a device entry that was not ``skipped``; a request
succeeded when its overall status is ``succeeded``, and a rejected request
did not. Percentiles interpolate linearly between the closest ranks (as
numpy's default does).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from mayfly.aggregator.archive import ArchivedEvent, event_time
from mayfly.aggregator.windows import device_seconds, task_seconds
from mayfly.events import DeviceResult, DeviceStatus, OverallStatus, TaskCompleted

__all__ = [
    "BUCKET_SIZES",
    "DEVICE_ERRORS",
    "MAX_REQUEST_IDS",
    "DeviceInsight",
    "Insights",
    "RejectionReason",
    "TaskInsight",
    "TimeBucket",
    "choose_bucket",
    "compute_insights",
    "failure_kind",
    "insights_to_json",
    "percentile",
]

#: Bucket widths a report picks from, narrowest first.
BUCKET_SIZES = (
    # Seconds first: a run of a few seconds (the demo's) gets buckets of its
    # own size, not one bucket of a minute.
    timedelta(seconds=1),
    timedelta(seconds=5),
    timedelta(seconds=15),
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=3),
    timedelta(hours=6),
    timedelta(days=1),
    timedelta(days=7),
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UNKNOWN_TASK = "(unknown)"
#: The version column of rejections: they never resolved one.
NO_VERSION = "-"
#: Request ids kept behind each bad number, the latest.
MAX_REQUEST_IDS = 5
#: How the errors of a device's own failures start: the exceptions package
#: code gets from its device handle (unreachable, refused, ``wait_until``
#: gave up), as the task process names them.
DEVICE_ERRORS = ("DeviceUnavailableError:", "DeviceActionError:", "DeviceError:")


def failure_kind(device: DeviceResult) -> str | None:
    """Who a device's outcome is on: ``device`` (its own errors, and attempts
    that ran out of time), ``package`` (the package could not load, raised
    something else, died, broke protocol or a limit), ``canceled``; None for a
    success or a device skipped."""
    status = device.status
    if status in (DeviceStatus.SUCCEEDED, DeviceStatus.SKIPPED):
        return None
    if status is DeviceStatus.CANCELED:
        return "canceled"
    if status is DeviceStatus.TIMED_OUT or (device.error or "").startswith(DEVICE_ERRORS):
        return "device"
    return "package"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values``, or None when there are none.

    Linear interpolation between closest ranks: ``percentile([1, 2, 3, 4], 50)``
    is 2.5.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass(frozen=True)
class TaskInsight:
    """How one version of a task type fared (``version`` ``-``: its rejections)."""

    task: str
    version: str
    requests: int
    succeeded: int
    rejected: int
    devices_run: int
    device_successes: int
    success_rate: float | None
    device_success_rate: float | None
    p50_duration_s: float | None
    p95_duration_s: float | None
    p50_cold_start_ms: float | None
    partial: int = 0
    failed: int = 0
    canceled: int = 0
    package_errors: int = 0
    """Device executions that failed for the package's reasons (:func:`failure_kind`)."""
    problems: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The latest request ids behind each bad number: by outcome (``partial``,
    ``failed``, ``canceled``, ``rejected``, ``package_errors``)."""


@dataclass(frozen=True)
class DeviceInsight:
    """How one device fared across every task."""

    device_id: str
    executions: int
    succeeded: int
    success_rate: float | None
    """Of the executions the device answers for (not the package's failures)."""
    #: Outcomes other than ``succeeded`` (``skipped`` included), by status.
    by_status: dict[str, int]
    p50_duration_s: float | None
    last_error: str | None
    """The last error of its own (a package's failure is the package's)."""
    last_error_at: datetime | None
    last_seen: datetime
    package_errors: int = 0
    """Executions that failed for the package's reasons, not the device's."""
    canceled: int = 0
    last_error_request: str | None = None

    @property
    def failures(self) -> int:
        """Executions that failed for the device's own reasons (skipped devices
        did not execute; canceled and package-caused failures are not its)."""
        return self.executions - self.succeeded - self.package_errors - self.canceled


@dataclass(frozen=True)
class TimeBucket:
    """Requests that ended within ``[start, start + bucket)``."""

    start: datetime
    requests: int
    succeeded: int
    success_rate: float | None
    p50_duration_s: float | None
    p95_duration_s: float | None


@dataclass(frozen=True)
class RejectionReason:
    """Rejections of one task type, with one code and one reason."""

    task: str
    code: str
    reason: str
    count: int
    request_ids: tuple[str, ...]
    """The latest of them (at most :data:`MAX_REQUEST_IDS`)."""


@dataclass(frozen=True)
class Insights:
    """Everything ``mayfly report`` shows."""

    results: int
    rejections: int
    first: datetime | None
    last: datetime | None
    tasks: tuple[TaskInsight, ...]
    #: Worst first, at most ``top`` of them.
    devices: tuple[DeviceInsight, ...]
    devices_total: int
    bucket: timedelta
    buckets: tuple[TimeBucket, ...] = field(default=())
    rejection_reasons: tuple[RejectionReason, ...] = field(default=())
    """Most frequent first."""

    @property
    def empty(self) -> bool:
        return self.results + self.rejections == 0


def choose_bucket(first: datetime, last: datetime, max_buckets: int = 48) -> timedelta:
    """The narrowest of :data:`BUCKET_SIZES` giving at most ``max_buckets`` buckets."""
    span = last - first
    for size in BUCKET_SIZES:
        if span / size < max_buckets:
            return size
    return BUCKET_SIZES[-1]


def _bucket_start(moment: datetime, size: timedelta) -> datetime:
    return _EPOCH + (moment - _EPOCH) // size * size


@dataclass
class _TaskAcc:
    requests: int = 0
    succeeded: int = 0
    rejected: int = 0
    devices_run: int = 0
    device_successes: int = 0
    durations: list[float] = field(default_factory=list)
    cold_starts: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    package_errors: int = 0
    problems: dict[str, deque[str]] = field(default_factory=dict)

    def problem(self, kind: str, request_id: str) -> None:
        kept = self.problems.setdefault(kind, deque(maxlen=MAX_REQUEST_IDS))
        if request_id not in kept:
            kept.append(request_id)


@dataclass
class _RejectionAcc:
    count: int = 0
    request_ids: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_REQUEST_IDS))


@dataclass
class _DeviceAcc:
    executions: int = 0
    succeeded: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_error_request: str | None = None
    last_seen: datetime = _EPOCH
    package_errors: int = 0
    canceled: int = 0


@dataclass
class _BucketAcc:
    requests: int = 0
    succeeded: int = 0
    durations: list[float] = field(default_factory=list)


def compute_insights(
    events: Iterable[ArchivedEvent],
    *,
    top: int | None = 10,
    bucket: timedelta | None = None,
) -> Insights:
    """Compute the insights of ``events``.

    Args:
        events: archived results and rejections.
        top: devices to keep (worst first); None keeps all.
        bucket: width of the time buckets; None picks one from the data.
    """
    ordered = sorted(events, key=event_time)
    tasks: dict[tuple[str, str], _TaskAcc] = defaultdict(_TaskAcc)
    reasons: dict[tuple[str, str, str], _RejectionAcc] = defaultdict(_RejectionAcc)
    devices: dict[str, _DeviceAcc] = defaultdict(_DeviceAcc)
    results = rejections = 0
    first = event_time(ordered[0]) if ordered else None
    last = event_time(ordered[-1]) if ordered else None
    size = bucket or (choose_bucket(first, last) if first and last else BUCKET_SIZES[0])
    buckets: dict[datetime, _BucketAcc] = defaultdict(_BucketAcc)

    for event in ordered:
        moment = event_time(event)
        slot = buckets[_bucket_start(moment, size)]
        slot.requests += 1
        if not isinstance(event, TaskCompleted):
            rejections += 1
            task = event.task or _UNKNOWN_TASK
            acc = tasks[(task, NO_VERSION)]
            acc.requests += 1
            acc.rejected += 1
            request_id = event.request_id or event.id
            acc.problem("rejected", request_id)
            why = reasons[(task, event.code.value, event.reason)]
            why.count += 1
            why.request_ids.append(request_id)
            continue
        results += 1
        acc = tasks[(event.task, event.package.version)]
        acc.requests += 1
        acc.outcomes[event.status.value] += 1
        if event.status is not OverallStatus.SUCCEEDED:
            acc.problem(event.status.value, event.request_id)
        duration = task_seconds(event)
        acc.durations.append(duration)
        slot.durations.append(duration)
        if event.status is OverallStatus.SUCCEEDED:
            acc.succeeded += 1
            slot.succeeded += 1
        if event.timings.cold_start_ms is not None:
            acc.cold_starts.append(event.timings.cold_start_ms)
        for device in event.devices:
            dev = devices[device.device_id]
            seen = device.finished_at or moment
            dev.last_seen = max(dev.last_seen, seen)
            kind = failure_kind(device)
            if device.status is DeviceStatus.SUCCEEDED:
                dev.succeeded += 1
                acc.device_successes += 1
            else:
                dev.by_status[device.status.value] += 1
            if kind == "package":
                dev.package_errors += 1
                acc.package_errors += 1
                acc.problem("package_errors", event.request_id)
            elif kind == "canceled":
                dev.canceled += 1
            if device.status is not DeviceStatus.SKIPPED:
                dev.executions += 1
                acc.devices_run += 1
            seconds = device_seconds(device)
            if seconds is not None:
                dev.durations.append(seconds)
            fresher = dev.last_error_at is None or seen >= dev.last_error_at
            if device.error and kind == "device" and fresher:
                dev.last_error, dev.last_error_at = device.error, seen
                dev.last_error_request = event.request_id

    task_rows = tuple(
        TaskInsight(
            task=name,
            version=version,
            requests=acc.requests,
            succeeded=acc.succeeded,
            rejected=acc.rejected,
            devices_run=acc.devices_run,
            device_successes=acc.device_successes,
            success_rate=_rate(acc.succeeded, acc.requests),
            device_success_rate=_rate(acc.device_successes, acc.devices_run),
            p50_duration_s=percentile(acc.durations, 50),
            p95_duration_s=percentile(acc.durations, 95),
            p50_cold_start_ms=percentile(acc.cold_starts, 50),
            partial=acc.outcomes[OverallStatus.PARTIAL.value],
            failed=acc.outcomes[OverallStatus.FAILED.value],
            canceled=acc.outcomes[OverallStatus.CANCELED.value],
            package_errors=acc.package_errors,
            problems={kind: tuple(reversed(ids)) for kind, ids in acc.problems.items()},
        )
        for (name, version), acc in sorted(tasks.items())
    )
    device_rows = sorted(
        (
            DeviceInsight(
                device_id=name,
                executions=dev.executions,
                succeeded=dev.succeeded,
                success_rate=_rate(
                    dev.succeeded, dev.executions - dev.package_errors - dev.canceled
                ),
                by_status=dict(dev.by_status.most_common()),
                p50_duration_s=percentile(dev.durations, 50),
                last_error=dev.last_error,
                last_error_at=dev.last_error_at,
                last_seen=dev.last_seen,
                package_errors=dev.package_errors,
                canceled=dev.canceled,
                last_error_request=dev.last_error_request,
            )
            for name, dev in devices.items()
        ),
        key=_worst_first,
    )
    bucket_rows = tuple(
        TimeBucket(
            start=start,
            requests=slot.requests,
            succeeded=slot.succeeded,
            success_rate=_rate(slot.succeeded, slot.requests),
            p50_duration_s=percentile(slot.durations, 50),
            p95_duration_s=percentile(slot.durations, 95),
        )
        for start, slot in sorted(buckets.items())
    )
    rejection_rows = tuple(
        RejectionReason(task, code, reason, acc.count, tuple(reversed(acc.request_ids)))
        for (task, code, reason), acc in sorted(
            reasons.items(), key=lambda item: (-item[1].count, item[0])
        )
    )
    return Insights(
        rejection_reasons=rejection_rows,
        results=results,
        rejections=rejections,
        first=first,
        last=last,
        tasks=task_rows,
        devices=tuple(device_rows if top is None else device_rows[:top]),
        devices_total=len(device_rows),
        bucket=size,
        buckets=bucket_rows,
    )


def _worst_first(row: DeviceInsight) -> tuple[float, int, float, str]:
    rate = row.success_rate if row.success_rate is not None else 1.0
    return (rate, -row.failures, -(row.p50_duration_s or 0.0), row.device_id)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def insights_to_json(insights: Insights) -> dict[str, Any]:
    """Insights as JSON-ready values (times as RFC 3339, the bucket in seconds)."""
    data: dict[str, Any] = _jsonable(asdict(insights))
    data["bucket_seconds"] = data.pop("bucket")
    for row, device in zip(data["devices"], insights.devices, strict=True):
        row["failures"] = device.failures
    return data
