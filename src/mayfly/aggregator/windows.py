"""When a request and a device ran, as traces and reports both measure it."""

from __future__ import annotations

from datetime import datetime

from mayfly.events import DeviceResult, TaskCompleted

__all__ = ["device_seconds", "task_seconds", "task_window"]


def task_window(result: TaskCompleted) -> tuple[datetime, datetime]:
    """Start and end of a request: from publication (else receipt) to the finish.

    Queueing is part of what a publisher waits for, so it is counted. A
    publish time later than the receipt (the two clocks disagree) falls back
    to the receipt.
    """
    timings = result.timings
    start = timings.published_at or timings.received_at
    if start > timings.received_at:
        start = timings.received_at
    return start, max(timings.finished_at, start)


def task_seconds(result: TaskCompleted) -> float:
    """Length of :func:`task_window` in seconds."""
    start, end = task_window(result)
    return (end - start).total_seconds()


def device_seconds(device: DeviceResult) -> float | None:
    """How long a device ran, or None if it did not both start and finish."""
    if device.started_at is None or device.finished_at is None:
        return None
    return max((device.finished_at - device.started_at).total_seconds(), 0.0)
