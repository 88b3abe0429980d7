"""Synthetic results, an archive folder and in-memory telemetry for aggregator tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mayfly.aggregator import Aggregator, LocalResultArchive
from mayfly.errors import PackageNotFoundError
from mayfly.events import (
    CoordinatorInfo,
    DeviceResult,
    OverallStatus,
    PackageRef,
    TaskCompleted,
    TaskRejected,
    Timings,
    rejection_for,
)
from mayfly.telemetry import Telemetry, configure_telemetry

T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISHER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PUBLISHER_SPAN_ID}-01"
DIGEST = "sha256:" + "ab" * 32
DATA = Path(__file__).parents[1] / "data"


def device(
    device_id: str,
    status: str = "succeeded",
    *,
    start: float | None = 1.0,
    seconds: float = 0.5,
    error: str | None = None,
    attempts: int = 1,
    at: datetime = T0,
) -> DeviceResult:
    """A device result starting ``start`` s after ``at`` and running ``seconds``."""
    started = at + timedelta(seconds=start) if start is not None else None
    return DeviceResult(
        device_id=device_id,
        status=status,
        started_at=started,
        finished_at=started + timedelta(seconds=seconds) if started is not None else None,
        attempts=attempts if started is not None else 0,
        error=error,
    )


def result(
    request_id: str = "req-1",
    *,
    task: str = "reboot",
    devices: Sequence[DeviceResult] = (),
    status: str | None = None,
    at: datetime = T0,
    duration: float = 3.0,
    queued: float = 0.5,
    cold_start_ms: float | None = 8.0,
    traceparent: str | None = TRACEPARENT,
    coordinator: str = "coord-1",
) -> TaskCompleted:
    """A whole result published at ``at``, received ``queued`` s later, ``duration`` s long."""
    if not devices:
        devices = (device("sim-0001"), device("sim-0002"))
    if status is None:
        ok = [d.status == "succeeded" for d in devices]
        status = "succeeded" if all(ok) else "partial" if any(ok) else "failed"
    received = at + timedelta(seconds=queued)
    return TaskCompleted(
        request_id=request_id,
        task=task,
        package=PackageRef(name=task, version="1.2.0", digest=DIGEST),
        status=OverallStatus(status),
        devices=tuple(devices),
        timings=Timings(
            published_at=at,
            received_at=received,
            started_at=received + timedelta(milliseconds=10),
            finished_at=at + timedelta(seconds=duration),
            cold_start_ms=cold_start_ms,
        ),
        coordinator=CoordinatorInfo(id=coordinator, host="node-1", pid=42, mode="local"),
        time=at + timedelta(seconds=duration),
        traceparent=traceparent,
    )


def rejection(
    request_id: str = "req-bad", *, task: str = "firmware-updater", at: datetime = T0
) -> TaskRejected:
    """A rejection, 0.2 s after ``at``, of a request for an unknown task published at ``at``."""
    rejected = rejection_for(
        PackageNotFoundError("no such package", package=task),
        {
            "id": request_id,
            "tasktype": task,
            "traceparent": TRACEPARENT,
            "time": at.isoformat(),
        },
    )
    return rejected.model_copy(update={"time": at + timedelta(seconds=0.2)})


@dataclass
class Telemetered:
    """An aggregator whose spans and metrics land in memory."""

    aggregator: Aggregator
    telemetry: Telemetry
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    archive: LocalResultArchive

    def spans(self) -> tuple[ReadableSpan, ...]:
        self.telemetry.flush()
        return self.exporter.get_finished_spans()

    def metric(self, name: str) -> Metric:
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return metric
        raise AssertionError(f"no metric {name}")


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    return tmp_path / "archive"


@pytest.fixture
def telemetered(archive_dir: Path) -> Iterator[Telemetered]:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    telemetry = configure_telemetry("mayfly-test", span_exporter=exporter, metric_reader=reader)
    archive = LocalResultArchive(archive_dir)
    aggregator = Aggregator(
        telemetry.tracer("test"), telemetry.meter("test"), archive, messaging_system="sqlite"
    )
    yield Telemetered(aggregator, telemetry, exporter, reader, archive)
    telemetry.shutdown()
