"""configure_telemetry: where spans go, and the OTLP-JSON file they go to without Jaeger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mayfly.aggregator import Aggregator
from mayfly.errors import ConfigError
from mayfly.settings import Settings
from mayfly.telemetry import (
    configure_telemetry,
)

from .conftest import PUBLISHER_SPAN_ID, TRACE_ID, device, rejection, result


def test_a_line_torn_by_a_kill_leaves_the_next_run_s_lines_whole(tmp_path: Path) -> None:
    trace_file = tmp_path / "traces.jsonl"
    trace_file.write_text('{"resourceSpans":[{"resource":')  # a kill -9 mid-write
    telemetry = configure_telemetry("mayfly-aggregator", trace_file=trace_file)
    Aggregator(telemetry.tracer(), telemetry.meter(), None).handle(result())
    telemetry.shutdown()
    torn, *lines = trace_file.read_text().splitlines()
    assert torn == '{"resourceSpans":[{"resource":'
    assert lines
    assert all(json.loads(line)["resourceSpans"] for line in lines)


def test_the_trace_file_holds_otlp_json_export_requests(tmp_path: Path) -> None:
    trace_file = tmp_path / "telemetry" / "traces.jsonl"
    metrics_file = tmp_path / "telemetry" / "metrics.jsonl"
    telemetry = configure_telemetry(
        "mayfly-aggregator", trace_file=trace_file, metrics_file=metrics_file
    )
    aggregator = Aggregator(telemetry.tracer(), telemetry.meter(), None)
    aggregator.handle(result(devices=[device("sim-0001"), device("sim-0002", "failed")]))
    aggregator.handle(rejection())
    telemetry.shutdown()

    lines = trace_file.read_text().splitlines()
    assert lines
    spans = []
    for line in lines:
        request = json.loads(line)  # every line is one JSON object
        [resource_spans] = request["resourceSpans"]
        service = {a["key"]: a["value"] for a in resource_spans["resource"]["attributes"]}[
            "service.name"
        ]
        assert service == {"stringValue": "mayfly-aggregator"}
        for scope in resource_spans["scopeSpans"]:
            spans.extend(scope["spans"])
    assert len(spans) == 5  # root, task and 2 devices, and the rejection
    # OTLP/JSON: hex ids (not protobuf's base64), integer enums, camelCase names.
    assert {s["traceId"] for s in spans} == {TRACE_ID}
    roots = [s for s in spans if s["parentSpanId"] == PUBLISHER_SPAN_ID]
    assert sorted(r["name"] for r in roots) == [
        "process mayfly.requests.normal",
        "process mayfly.requests.normal",
    ]
    [root] = [r for r in roots if any(s["parentSpanId"] == r["spanId"] for s in spans)]
    [task] = [s for s in spans if s["parentSpanId"] == root["spanId"]]
    assert task["name"] == "task reboot"
    children = [s for s in spans if s["parentSpanId"] == task["spanId"]]
    assert sorted(c["name"] for c in children) == ["device sim-0001", "device sim-0002"]
    assert root["kind"] == 5  # SPAN_KIND_CONSUMER
    assert root["startTimeUnixNano"] == "1741942800500000000"  # received at 09:00:00.5Z
    [failed] = [c for c in children if c["name"] == "device sim-0002"]
    assert failed["status"]["code"] == 2  # STATUS_CODE_ERROR

    metric_lines = metrics_file.read_text().splitlines()
    names = {
        metric["name"]
        for line in metric_lines
        for resource in json.loads(line)["resourceMetrics"]
        for scope in resource["scopeMetrics"]
        for metric in scope["metrics"]
    }
    assert {"mayfly.task.duration", "mayfly.task.requests", "mayfly.device.executions"} <= names


def test_an_endpoint_takes_precedence_over_the_file(tmp_path: Path) -> None:
    telemetry = configure_telemetry(
        "x", otlp_endpoint="http://127.0.0.1:4318/", trace_file=tmp_path / "t.jsonl"
    )
    try:
        assert telemetry.destination == "http://127.0.0.1:4318/v1/traces"
    finally:
        telemetry.shutdown()
    assert not (tmp_path / "t.jsonl").exists()


def test_an_endpoint_that_is_not_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        configure_telemetry("x", otlp_endpoint="127.0.0.1:4318")


def test_options_from_the_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    base = {"MAYFLY_HOME": str(home)}
    settings = Settings.from_env(base)
    assert (settings.otlp_endpoint, settings.trace_file, settings.otlp_metrics_endpoint) == (
        None,
        home / "telemetry" / "traces.jsonl",
        None,
    )
    to_jaeger = Settings.from_env(base | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert (to_jaeger.otlp_endpoint, to_jaeger.trace_file, to_jaeger.otlp_metrics_endpoint) == (
        "http://127.0.0.1:4318",
        None,
        None,
    )
    with_metrics = Settings.from_env(
        base
        | {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_METRICS_EXPORTER": "otlp"},
    )
    assert with_metrics.otlp_metrics_endpoint == "http://collector:4318"
    assert Settings.from_env(
        base | {"MAYFLY_TRACE_FILE": str(tmp_path / "t.jsonl")}
    ).trace_file == (tmp_path / "t.jsonl")
