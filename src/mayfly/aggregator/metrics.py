"""The aggregator's metrics, through the OpenTelemetry metrics API.

=============================  =========  ==========================================
``mayfly.task.duration``       histogram  s; publication to finish, per task and
                                          ``mayfly.request.status``
``mayfly.device.duration``     histogram  s; one device's run, per task and
                                          ``mayfly.device.status``
``mayfly.task.requests``       counter    requests that ended, per task and status
                                          (``rejected`` with ``mayfly.rejection.code``)
``mayfly.device.executions``   counter    per task, device status and ``mayfly.device.id``
=============================  =========  ==========================================

The counters are counted here and reported through asynchronous (observable)
counters: a synchronous ``add`` costs the SDK some 20 microseconds per call
(attribute validation and hashing), which a fan-out over thousands of devices
would pay per device. An observable counter reports the same cumulative sums
at collection time. Device ids make ``mayfly.device.executions`` a
high-cardinality metric: :func:`mayfly.telemetry.configure_telemetry` raises
its cardinality limit above the SDK's default of 2,000 series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TypeAlias

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.util.types import AttributeValue

from mayfly.aggregator.attributes import (
    DEVICE_ID,
    DEVICE_STATUS,
    REJECTED_STATUS,
    REJECTION_CODE,
    REQUEST_STATUS,
    TASK,
)
from mayfly.aggregator.windows import device_seconds
from mayfly.events import TaskCompleted, TaskRejected

__all__ = [
    "METRIC_DEVICE_DURATION",
    "METRIC_DEVICE_EXECUTIONS",
    "METRIC_TASK_DURATION",
    "METRIC_TASK_REQUESTS",
    "ResultMetrics",
]

METRIC_TASK_DURATION = "mayfly.task.duration"
METRIC_DEVICE_DURATION = "mayfly.device.duration"
METRIC_DEVICE_EXECUTIONS = "mayfly.device.executions"
METRIC_TASK_REQUESTS = "mayfly.task.requests"

# (task, status, code) and (task, status, device id): None drops the attribute.
_Key: TypeAlias = tuple[str | None, str, str | None]


class _Tally:
    """Cumulative counts per attribute key, safe to read from the export thread."""

    def __init__(self, names: tuple[str, str, str]) -> None:
        self._names = names
        self._lock = threading.Lock()
        self.counts: dict[_Key, int] = {}

    def add_all(self, keys: Iterable[_Key]) -> None:
        counts = self.counts
        with self._lock:
            for key in keys:
                counts[key] = counts.get(key, 0) + 1

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            snapshot = list(self.counts.items())
        names = self._names
        for key, count in snapshot:
            attributes: dict[str, AttributeValue] = {
                name: value for name, value in zip(names, key, strict=True) if value is not None
            }
            yield Observation(count, attributes)


class ResultMetrics:
    """Records the measurements of complete results and rejections."""

    def __init__(self, meter: Meter) -> None:
        self._task_duration = meter.create_histogram(
            METRIC_TASK_DURATION,
            unit="s",
            description="Time from a request's publication to its result.",
        )
        self._device_duration = meter.create_histogram(
            METRIC_DEVICE_DURATION,
            unit="s",
            description="Time one device took to run a task.",
        )
        self._requests = _Tally((TASK, REQUEST_STATUS, REJECTION_CODE))
        self._executions = _Tally((TASK, DEVICE_STATUS, DEVICE_ID))
        meter.create_observable_counter(
            METRIC_TASK_REQUESTS,
            callbacks=[self._requests.observe],
            unit="{request}",
            description="Requests that ended, rejected ones included.",
        )
        meter.create_observable_counter(
            METRIC_DEVICE_EXECUTIONS,
            callbacks=[self._executions.observe],
            unit="{execution}",
            description="Device executions of a task.",
        )

    def record_completed(self, result: TaskCompleted, duration_s: float) -> None:
        """Measure a whole result whose request took ``duration_s``."""
        task, status = result.task, result.status.value
        self._task_duration.record(duration_s, {TASK: task, REQUEST_STATUS: status})
        self._requests.add_all(((task, status, None),))
        # One attribute dict per device status, reused for every device.
        by_status: dict[str, dict[str, AttributeValue]] = {}
        record = self._device_duration.record
        for device in result.devices:
            seconds = device_seconds(device)
            if seconds is not None:
                d_status = device.status.value
                attributes = by_status.get(d_status)
                if attributes is None:
                    attributes = by_status[d_status] = {TASK: task, DEVICE_STATUS: d_status}
                record(seconds, attributes)
        self._executions.add_all(
            (task, device.status.value, device.device_id) for device in result.devices
        )

    def record_rejected(self, rejection: TaskRejected) -> None:
        """Count a rejected request."""
        self._requests.add_all(((rejection.task, REJECTED_STATUS, rejection.code.value),))
