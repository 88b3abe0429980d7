"""Aggregator: result events per second turned into spans and exported to Jaeger.

Mayfly: Kafka-encoded ``task.completed`` records (one device each, as the
pipeline benchmark makes) decoded and handed to the aggregator in batches of
500, as its consumer loop does: spans (a root, the run and one per device) and
metrics, exported over OTLP/HTTP to the real Jaeger of `make up`; the clock
stops once the exporter has flushed everything. No archive: this measures
the trace path.

Mayfly's aggregator gets ``telemetry.bulk_tracer()``, as ``mayfly up`` wires
it: spans as plain records, encoded and posted from a child process.

Baseline: the same spans made directly with the OpenTelemetry SDK (no
decoding, no metrics, no Mayfly) through the stock batch processor and the
SDK's OTLP/HTTP exporter to the same endpoint, what a hand-written consumer
would cost at best. Also reported: Mayfly with a discarding SDK exporter (no
export, SDK spans), the span-making part as it was before the bulk tracer.

    python bench/aggregator.py [--events 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import service_env, write_json
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from mayfly.aggregator import Aggregator
from mayfly.events import (
    CoordinatorInfo,
    DeviceResult,
    PackageRef,
    TaskCompleted,
    Timings,
    from_kafka,
    new_request,
    to_kafka_record,
)
from mayfly.telemetry import configure_telemetry

BATCH = 500


class _Discard(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _records(count: int) -> list[tuple[Any, Any, Any]]:
    now = datetime.now(UTC)
    out = []
    for i in range(count):
        request = new_request("bench-push", devices=[f"sim-{i % 2000 + 1:04d}"])
        start = now + timedelta(milliseconds=i)
        result = TaskCompleted(
            request_id=request.id,
            task=request.task,
            priority=request.priority,
            traceparent=request.traceparent,
            package=PackageRef(name="bench-push", version="1.0.0", digest="sha256:" + "0" * 64),
            status="succeeded",
            devices=(
                DeviceResult(
                    device_id=request.devices[0],
                    status="succeeded",
                    started_at=start,
                    finished_at=start + timedelta(milliseconds=3),
                    attempts=1,
                    output="config-push",
                ),
            ),
            timings=Timings(
                published_at=request.time,
                received_at=start,
                started_at=start,
                finished_at=start + timedelta(milliseconds=4),
                cold_start_ms=20.0,
            ),
            coordinator=CoordinatorInfo(id="bench", host="localhost", pid=1, mode="local"),
        )
        key, value, headers = to_kafka_record(result)
        out.append((headers, key, value))
    return out


def mayfly(records: list[tuple[Any, Any, Any]], endpoint: str | None) -> dict[str, Any]:
    telemetry = configure_telemetry(
        "mayfly-bench-aggregator",
        otlp_endpoint=endpoint,
        span_exporter=None if endpoint else _Discard(),
    )
    aggregator = Aggregator(telemetry.bulk_tracer(), telemetry.meter(), None)
    started = time.perf_counter()
    for i in range(0, len(records), BATCH):
        events = [from_kafka(h, k, v) for h, k, v in records[i : i + BATCH]]
        aggregator.handle_many(events)  # type: ignore[arg-type]
    handled = time.perf_counter()
    flushed = telemetry.flush(120_000)
    done = time.perf_counter()
    telemetry.shutdown()
    return {
        "events": len(records),
        "spans": 3 * len(records),
        "rate_per_s": round(len(records) / (done - started), 1),
        "handled_rate_per_s": round(len(records) / (handled - started), 1),
        "exported_all": flushed,
    }


def bare_sdk(count: int, endpoint: str) -> dict[str, Any]:
    """The same three spans per event, straight through the SDK and the same exporter."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The stock SDK pipeline, built here rather than by configure_telemetry (whose
    # bulk tracer the aggregator uses): batch processor and OTLP/HTTP exporter in
    # this process, the queue as large as Mayfly's so that nothing is dropped.
    provider = TracerProvider(resource=Resource.create({"service.name": "mayfly-bench-baseline"}))
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"),
            max_queue_size=65_536,
            max_export_batch_size=1024,
        )
    )
    tracer = provider.get_tracer("mayfly")
    now = time.time_ns()
    started = time.perf_counter()
    for i in range(count):
        t = now + i * 1_000_000
        # The aggregator's shape: the request's processing, its run, a device.
        root = tracer.start_span(
            "process mayfly.requests.normal",
            kind=trace.SpanKind.CONSUMER,
            start_time=t,
            attributes={"mayfly.task": "bench-push", "messaging.system": "sqlite"},
        )
        run = tracer.start_span(
            "task bench-push",
            context=trace.set_span_in_context(root),
            start_time=t,
            attributes={"mayfly.task": "bench-push", "mayfly.request.status": "succeeded"},
        )
        child = tracer.start_span(
            "device sim",
            context=trace.set_span_in_context(run),
            start_time=t,
            attributes={"mayfly.device.id": f"sim-{i % 2000 + 1:04d}"},
        )
        child.end(t + 3_000_000)
        run.end(t + 4_000_000)
        root.end(t + 4_000_000)
    flushed = provider.force_flush(120_000)
    done = time.perf_counter()
    provider.shutdown()
    return {
        "events": count,
        "spans": 3 * count,
        "rate_per_s": round(count / (done - started), 1),
        "exported_all": flushed,
    }


def run(count: int) -> dict[str, Any]:
    endpoint = service_env().get("MAYFLY_TEST_OTLP_ENDPOINT")
    records = _records(count)
    out: dict[str, Any] = {"events": count, "otlp_endpoint": endpoint}
    out["mayfly_no_export"] = mayfly(records, None)
    if endpoint:
        out["mayfly"] = mayfly(records, endpoint)
        out["bare_sdk"] = bare_sdk(count, endpoint)
    else:
        out["skipped"] = "no Jaeger: run `make up` first"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = run(args.events)
    for name in ("mayfly", "mayfly_no_export", "bare_sdk"):
        if name in out:
            print(f"{name:<18} {out[name]['rate_per_s']:>9.1f} events/s")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
