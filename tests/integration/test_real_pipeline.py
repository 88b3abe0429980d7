"""The pipeline on the real servers: Kafka for events, S3 for packages, Jaeger for traces.

These are the tests that prove Mayfly on what its users run. They skip on a
laptop without the servers and fail under CI=true (see tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from kafka import KafkaProducer

from mayfly.aggregator import Aggregator
from mayfly.aggregator.ingest import Ingest
from mayfly.app.local import Runtime
from mayfly.app.wiring import open_event_log
from mayfly.cli import cli
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.eventlog.publisher import publish_request, server_of
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    from_kafka,
    new_request,
    to_http,
)
from mayfly.settings import Settings
from mayfly.telemetry import configure_telemetry
from mayfly.testing import publish_folders

from ..conftest import JaegerServer, S3Server

pytestmark = [pytest.mark.kafka, pytest.mark.s3, pytest.mark.jaeger]
ROOT = Path(__file__).parents[2]


@dataclass
class Stack:
    settings: Settings
    sim: Simulator
    jaeger: JaegerServer
    bootstrap: str


@pytest.fixture
def stack(
    tmp_path: Path,
    kafka_bootstrap: str,
    s3_bucket: tuple[S3Server, str],
    jaeger: JaegerServer,
) -> Iterator[Stack]:
    server, bucket = s3_bucket
    home = tmp_path / "home"
    # os.environ is already clean: tests/conftest.py's isolated_environment.
    env = dict(os.environ)
    env |= {
        "MAYFLY_HOME": str(home),
        "MAYFLY_INVENTORY": str(tmp_path / "inventory.json"),
        "MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}",
        "MAYFLY_TOPIC_PREFIX": f"mayfly-test-{uuid.uuid4().hex[:8]}",
        "MAYFLY_STORE": f"s3://{bucket}",
        "MAYFLY_S3_ENDPOINT": server.endpoint,
        "MAYFLY_S3_ACCESS_KEY": server.access_key,
        "MAYFLY_S3_SECRET_KEY": server.secret_key,
    }
    settings = Settings.from_env(env)
    publish_folders(settings, [ROOT / "taskpkgs" / "reboot", ROOT / "taskpkgs" / "config-push"])
    with SimulatorServer(Simulator(12, reboot_time=0.05)) as sim_server:
        Path(settings.inventory).write_bytes(sim_server.inventory().to_json())
        yield Stack(settings, sim_server.simulator, jaeger, kafka_bootstrap)


class _Collector:
    def __init__(self, aggregator: Aggregator | None = None) -> None:
        self.events: dict[str, MayflyEvent] = {}
        self.anonymous: list[TaskRejected] = []
        """Rejections of input that had no usable id (not a CloudEvent at all)."""
        self.lock = threading.Lock()
        self.aggregator = aggregator

    def __call__(self, events: list[MayflyEvent]) -> None:
        if self.aggregator is not None:
            self.aggregator.handle_many(
                [e for e in events if isinstance(e, TaskCompleted | TaskRejected)]
            )
        with self.lock:
            for event in events:
                if isinstance(event, TaskCompleted | TaskRejected) and event.request_id:
                    self.events[event.request_id] = event
                elif isinstance(event, TaskRejected):
                    self.anonymous.append(event)

    def has(self, ids: set[str]) -> bool:
        with self.lock:
            return ids <= set(self.events)


def _run_until(runtime: Runtime, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    runtime.run(lambda: check() or time.monotonic() > deadline)


def test_requests_run_from_kafka_with_packages_from_s3_and_traces_in_jaeger(
    stack: Stack,
) -> None:
    telemetry = configure_telemetry("mayfly-it", otlp_endpoint=stack.jaeger.otlp_endpoint)
    results = _Collector(
        Aggregator(
            telemetry.bulk_tracer(),
            telemetry.meter(),
            None,
            destination=stack.settings.topics.results,
            server=server_of(stack.settings.event_log),
        )
    )
    runtime = Runtime(stack.settings, ingest=Ingest(None, on_events=results))
    runtime.start()
    try:
        publisher = telemetry.tracer("mayfly.publisher")
        sent = [
            publish_request(
                runtime.log, new_request("reboot", devices=ids), publisher, stack.settings.topics
            )
            for ids in (["sim-0001", "sim-0002", "sim-0003"], ["sim-0004"])
        ]
        ids = {r.id for r in sent}
        _run_until(runtime, lambda: results.has(ids), 90)
    finally:
        runtime.close()
        telemetry.flush()
        telemetry.shutdown()
    assert results.has(ids)
    for request in sent:
        result = results.events[request.id]
        assert isinstance(result, TaskCompleted)
        assert result.status == "succeeded"
        assert result.traceparent == request.traceparent
    # The package came from S3: the bucket holds it, and the result names its digest.
    first = results.events[sent[0].id]
    assert isinstance(first, TaskCompleted)
    assert first.package.digest.startswith("sha256:")

    # Results are on the results topic of the real broker.
    log = open_event_log(stack.settings)
    consumer = log.consumer(f"it-{uuid.uuid4().hex[:6]}", stack.settings.topics.results)
    found: set[str] = set()
    deadline = time.monotonic() + 20
    while not ids <= found and time.monotonic() < deadline:
        for record in consumer.poll(100, 1.0):
            event = from_kafka(record.headers, record.key, record.value)
            if isinstance(event, TaskCompleted):
                found.add(event.request_id)
    consumer.close()
    log.close()
    assert ids <= found

    # Jaeger has the trace: send span -> process span -> task span -> one per device.
    request = sent[0]
    trace_id = str(request.traceparent).split("-")[1]
    spans = _jaeger_spans(stack.jaeger, trace_id, expected=6)
    by_name = {s["operationName"]: s for s in spans}
    lane = stack.settings.topics.lane(request.priority)
    send = by_name[f"send {lane}"]
    process = by_name[f"process {lane}"]
    task = by_name["task reboot"]
    devices = [s for s in spans if s["operationName"].startswith("device ")]
    assert sorted(s["operationName"] for s in devices) == [
        "device sim-0001",
        "device sim-0002",
        "device sim-0003",
    ]
    assert _parent(process) == send["spanID"]
    assert _parent(task) == process["spanID"]
    assert all(_parent(s) == task["spanID"] for s in devices)
    assert all(s["traceID"] == trace_id for s in spans)
    # On Kafka, both ends name the broker; the send its record's key.
    host, port = stack.bootstrap.split(",")[0].rsplit(":", 1)
    for span in (send, process):
        tags = {t["key"]: t["value"] for t in span["tags"]}  # type: ignore[attr-defined]
        assert tags["messaging.system"] == "kafka"
        assert tags["messaging.message.id"] == request.id
        assert tags["server.address"] == host
        assert int(tags["server.port"]) == int(port)
    send_tags = {t["key"]: t["value"] for t in send["tags"]}  # type: ignore[attr-defined]
    assert send_tags["messaging.kafka.message.key"] == request.partition_key
    assert send_tags["span.kind"] == "producer"


def _parent(span: dict[str, object]) -> str | None:
    for ref in span.get("references", []):  # type: ignore[attr-defined]
        if ref["refType"] == "CHILD_OF":
            return str(ref["spanID"])
    return None


def _jaeger_spans(jaeger: JaegerServer, trace_id: str, expected: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    spans: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        response = requests.get(f"{jaeger.query_url}/api/traces/{trace_id}", timeout=5)
        if response.status_code == 200:
            data = response.json().get("data") or []
            spans = data[0]["spans"] if data else []
            if len(spans) >= expected:
                return spans
        time.sleep(0.5)
    raise AssertionError(f"trace {trace_id}: {len(spans)} spans in Jaeger, expected {expected}")


def test_producers_that_are_not_mayfly(stack: Stack) -> None:
    topics = stack.settings.topics
    structured = new_request("reboot", devices=["sim-0005"])
    binary = new_request("reboot", devices=["sim-0006"])
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    try:
        # Structured mode, as another SDK might write it.
        _, body = to_http(structured, "structured")
        producer.send(
            topics.lane("normal"),
            key=b"sim-0005",
            value=body,
            headers=[("content-type", b"application/cloudevents+json")],
        ).get(30)
        # Binary mode written with plain kafka-python headers.
        headers = [
            (f"ce_{k}", v.encode())
            for k, v in binary.cloudevent_attributes().items()
            if k != "datacontenttype"
        ]
        headers.append(("content-type", b"application/json"))
        producer.send(
            topics.lane("normal"), key=b"sim-0006", value=binary.data_json(), headers=headers
        ).get(30)
        # Not a CloudEvent at all, as a KafkaSource would pass a plain record on.
        producer.send(topics.lane("normal"), key=b"junk", value=b'{"hello": "world"}').get(30)
        producer.send(topics.lane("normal"), key=b"junk2", value=b"\x00\xffnot json").get(30)
    finally:
        producer.close()

    results = _Collector()
    runtime = Runtime(stack.settings, ingest=Ingest(None, on_events=results))
    runtime.start()
    try:
        _run_until(runtime, lambda: len(results.events) + len(results.anonymous) >= 4, 90)
    finally:
        runtime.close()
    ran = {structured.id, binary.id}
    assert {k for k, e in results.events.items() if isinstance(e, TaskCompleted)} >= ran
    rejected = results.anonymous
    assert len(rejected) == 2, results.events
    assert {r.code for r in rejected} == {"not_a_cloudevent"}
    assert all("not a CloudEvent" in r.reason for r in rejected)

    # The rejections are on the dead-letter topic, with their reasons.
    log = open_event_log(stack.settings)
    consumer = log.consumer(f"it-{uuid.uuid4().hex[:6]}", topics.dead_letter)
    dead: list[MayflyEvent] = []
    deadline = time.monotonic() + 20
    while len(dead) < 2 and time.monotonic() < deadline:
        dead += [from_kafka(r.headers, r.key, r.value) for r in consumer.poll(100, 1.0)]
    consumer.close()
    log.close()
    assert len(dead) == 2
    assert all(isinstance(d, TaskRejected) and d.reason for d in dead)


def test_a_paused_broker_delays_requests_but_loses_none(stack: Stack) -> None:
    pid = int(
        subprocess.run(
            [sys.executable, str(ROOT / "dev" / "services"), "pid", "kafka"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    results = _Collector()
    runtime = Runtime(stack.settings, ingest=Ingest(None, on_events=results))
    runtime.start()
    sent = [new_request("reboot", devices=[f"sim-{i:04d}"]) for i in range(1, 13)]
    try:
        for request in sent[:6]:
            publish_request(runtime.log, request, topics=stack.settings.topics)
        paused = threading.Event()

        def pause_broker() -> None:
            time.sleep(0.5)
            os.kill(pid, signal.SIGSTOP)
            paused.set()
            try:
                time.sleep(4)
            finally:
                os.kill(pid, signal.SIGCONT)

        pauser = threading.Thread(target=pause_broker)
        pauser.start()
        paused.wait(5)
        for request in sent[6:]:  # published while the broker is stopped: they wait
            publish_request(runtime.log, request, topics=stack.settings.topics)
        ids = {r.id for r in sent}
        _run_until(runtime, lambda: results.has(ids), 120)
        pauser.join()
    finally:
        os.kill(pid, signal.SIGCONT)
        runtime.close()
    assert results.has({r.id for r in sent}), f"{len(results.events)} of {len(sent)}"
    not_run = {
        r.id: results.events[r.id]
        for r in sent
        if not isinstance(results.events[r.id], TaskCompleted)
    }
    assert not_run == {}
    assert stack.sim.duplicates() == []


def test_mayfly_publish_starts_the_trace_it_prints(
    tmp_path: Path, kafka_bootstrap: str, jaeger: JaegerServer
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    env = {"MAYFLY_HOME": str(tmp_path), "MAYFLY_TOPIC_PREFIX": prefix}
    # No store or inventory in this home: the trace is under test, not the checks.
    argv = ["publish", "reboot", "-d", "sim-0001", "--no-validate"]
    argv += ["--event-log", f"kafka://{kafka_bootstrap}"]
    argv += ["--otlp-endpoint", jaeger.otlp_endpoint]
    result = CliRunner(env=env).invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trace_id = result.output.split(" trace ")[1].strip()

    (span,) = _jaeger_spans(jaeger, trace_id, 1)
    assert span["operationName"] == f"send {prefix}.requests.normal"
    # The record on the lane carries the same trace, as CloudEvent and plain W3C headers.
    log = open_event_log(
        Settings.from_env(env | {"MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}"})
    )
    try:
        consumer = log.consumer("check", f"{prefix}.requests.normal")
        records = []
        deadline = time.monotonic() + 20
        while not records and time.monotonic() < deadline:
            records = consumer.poll(timeout_s=1.0)
    finally:
        log.close()
    (record,) = records
    headers = dict(record.headers)
    assert headers["traceparent"] == headers["ce_traceparent"]
    assert trace_id in headers["traceparent"].decode()
