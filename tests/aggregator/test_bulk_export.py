"""Bulk spans (`Telemetry.bulk_tracer`): the SDK's OTLP, exported from a child process."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.metrics import NoOpMeter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mayfly.aggregator import Aggregator
from mayfly.spanexport import RecordTracer, SpanRecord, encode_records
from mayfly.telemetry import Telemetry, _DerivedIdGenerator, configure_telemetry

from ..conftest import JaegerServer
from .conftest import PUBLISHER_SPAN_ID, TRACE_ID, device, rejection, result


class _Records:
    scope = ("mayfly", "0.1.0")

    def __init__(self) -> None:
        self.records: list[SpanRecord] = []

    def add(self, record: SpanRecord) -> None:
        self.records.append(record)


def _results() -> list[object]:
    tracestated = result("req-2").model_copy(update={"tracestate": "vendor=1"})
    return [
        result("req-1"),
        result(
            "req-3",
            devices=(
                device("sim-0001"),
                device("sim-0002", "failed", error="connection refused"),
                device("sim-0003", "skipped", start=None),
            ),
        ),
        result("req-4", traceparent=None),
        tracestated,
        rejection(),
    ]


def test_records_encode_to_the_request_the_sdk_encoder_makes() -> None:
    resource = Resource.create({"service.name": "mayfly-test"})
    memory = InMemorySpanExporter()
    # The aggregator derives every id from the request: both paths make the same ones.
    provider = TracerProvider(resource=resource, id_generator=_DerivedIdGenerator())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    Aggregator(provider.get_tracer("mayfly", "0.1.0"), NoOpMeter("t"), None).handle_many(
        _results()  # type: ignore[arg-type]
    )

    records = _Records()
    tracer = RecordTracer(records, provider.sampler, "mayfly", "0.1.0")  # type: ignore[arg-type]
    Aggregator(tracer, NoOpMeter("t"), None).handle_many(_results())  # type: ignore[arg-type]

    expected = encode_spans(memory.get_finished_spans())
    got = ExportTraceServiceRequest.FromString(encode_records(records.records, resource.attributes))
    assert len(records.records) == 18
    assert got == expected


def test_an_unsampled_parent_makes_no_record() -> None:
    records = _Records()
    tracer = RecordTracer(records, TracerProvider().sampler, "mayfly")  # type: ignore[arg-type]
    unsampled = f"00-{TRACE_ID}-{PUBLISHER_SPAN_ID}-00"
    Aggregator(tracer, NoOpMeter("t"), None).handle(result(traceparent=unsampled))
    assert records.records == []


# --- the export process, against a local OTLP receiver -------------------------


class _Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.span_ids: set[bytes] = set()
        self.status = 200
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.status == 200:
            request = ExportTraceServiceRequest.FromString(body)
            with self.server.lock:
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        self.server.span_ids.update(s.span_id for s in scope_spans.spans)
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def bulk(receiver: _Receiver) -> Iterator[Telemetry]:
    telemetry = configure_telemetry("mayfly-test", otlp_endpoint=receiver.endpoint)
    yield telemetry
    telemetry.shutdown()


def _feed(aggregator: Aggregator, first: int, count: int) -> None:
    aggregator.handle_many(
        [result(f"req-{i}", devices=(device(f"sim-{i}"),)) for i in range(first, first + count)]
    )


def test_flush_means_every_span_so_far_reached_the_endpoint(
    bulk: Telemetry, receiver: _Receiver
) -> None:
    aggregator = Aggregator(bulk.bulk_tracer(), bulk.meter(), None)
    # Over two batches, and a partial third left in the buffer.
    _feed(aggregator, 0, 1500)
    assert bulk.flush(30_000) is True
    assert len(receiver.span_ids) == 4500


def test_a_dead_export_process_is_reported_restarted_and_nothing_is_lost(
    bulk: Telemetry, receiver: _Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    aggregator = Aggregator(bulk.bulk_tracer(), bulk.meter(), None)
    _feed(aggregator, 0, 600)
    exporter = bulk._bulk
    assert exporter is not None
    assert exporter.pid is not None
    os.kill(exporter.pid, signal.SIGKILL)
    with caplog.at_level(logging.ERROR, "mayfly.telemetry"):
        _feed(aggregator, 600, 900)
        assert bulk.flush(30_000) is True
    assert len(receiver.span_ids) == 4500
    assert exporter.restarts == 1
    assert "span export process" in caplog.text


def test_spans_the_endpoint_refuses_make_flush_false_and_are_logged(
    bulk: Telemetry, receiver: _Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.status = 400
    aggregator = Aggregator(bulk.bulk_tracer(), bulk.meter(), None)
    with caplog.at_level(logging.ERROR, "mayfly.telemetry"):
        _feed(aggregator, 0, 10)
        assert bulk.flush(30_000) is False
    assert "30 span(s) not exported" in caplog.text


def test_shutdown_flushes_and_stops_the_export_process(receiver: _Receiver) -> None:
    telemetry = configure_telemetry("mayfly-test", otlp_endpoint=receiver.endpoint)
    _feed(Aggregator(telemetry.bulk_tracer(), telemetry.meter(), None), 0, 5)
    exporter = telemetry._bulk
    assert exporter is not None
    process = exporter._process
    telemetry.shutdown()
    assert len(receiver.span_ids) == 15
    assert process is not None
    assert process.poll() is not None


# --- the real Jaeger ---------------------------------------------------------------


@pytest.mark.jaeger
def test_bulk_spans_arrive_in_jaeger_with_names_attributes_and_parents(
    jaeger: JaegerServer,
) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{PUBLISHER_SPAN_ID}-01"
    telemetry = configure_telemetry("mayfly-bulk-test", otlp_endpoint=jaeger.otlp_endpoint)
    try:
        aggregator = Aggregator(telemetry.bulk_tracer("mayfly.aggregator"), telemetry.meter(), None)
        aggregator.handle(
            result(
                "req-jaeger",
                traceparent=traceparent,
                devices=(device("sim-0001"), device("sim-0002", "failed", error="refused")),
            )
        )
        assert telemetry.flush() is True
    finally:
        telemetry.shutdown()

    spans: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    while len(spans) < 4 and time.monotonic() < deadline:
        response = requests.get(f"{jaeger.query_url}/api/traces/{trace_id}", timeout=5)
        data = response.json().get("data") or [] if response.status_code == 200 else []
        spans = data[0]["spans"] if data else []
        time.sleep(0.2 if len(spans) < 4 else 0)
    by_name = {s["operationName"]: s for s in spans}
    assert sorted(by_name) == [
        "device sim-0001",
        "device sim-0002",
        "process mayfly.requests.normal",
        "task reboot",
    ]
    root = by_name["process mayfly.requests.normal"]
    tags = {t["key"]: t["value"] for t in root["tags"]}  # type: ignore[attr-defined]
    assert tags["messaging.message.id"] == "req-jaeger"
    assert tags["span.kind"] == "consumer"
    assert tags["otel.status_code"] == "ERROR"
    assert tags["error.type"] == "partial"
    task = by_name["task reboot"]
    task_tags = {t["key"]: t["value"] for t in task["tags"]}  # type: ignore[attr-defined]
    assert task_tags["mayfly.request.id"] == "req-jaeger"
    assert task_tags["mayfly.request.status"] == "partial"
    assert task["references"] == [
        {"refType": "CHILD_OF", "traceID": trace_id, "spanID": root["spanID"]}
    ]
    failed = {t["key"]: t["value"] for t in by_name["device sim-0002"]["tags"]}  # type: ignore[attr-defined]
    assert failed["mayfly.device.status"] == "failed"
    assert failed["otel.status_description"] == "refused"
    assert root["references"] == [  # the publisher's span, from the traceparent
        {"refType": "CHILD_OF", "traceID": trace_id, "spanID": PUBLISHER_SPAN_ID}
    ]
    for name in ("device sim-0001", "device sim-0002"):
        (ref,) = by_name[name]["references"]  # type: ignore[misc]
        assert ref["spanID"] == task["spanID"]
