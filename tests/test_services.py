"""The real servers started by dev/services answer like the real thing."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from kafka import KafkaConsumer, KafkaProducer

if TYPE_CHECKING:
    from tests.conftest import JaegerServer, S3Server

SERVICES = Path(__file__).parents[1] / "dev" / "services"


@pytest.mark.s3
def test_s3_stores_lists_and_returns_an_object(s3_bucket: tuple[S3Server, str]) -> None:
    server, bucket = s3_bucket
    client = server.client()
    payload = os.urandom(64 * 1024) + b"\x00end"
    name = "packages/demo/1.0.0/package.tar.gz"

    client.put_object(bucket, name, io.BytesIO(payload), length=len(payload))

    response = client.get_object(bucket, name)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()
    listed = [(obj.object_name, obj.size) for obj in client.list_objects(bucket, recursive=True)]
    assert listed == [(name, len(payload))]


@pytest.mark.kafka
def test_kafka_produces_and_consumes_a_record(kafka_bootstrap: str) -> None:
    topic = f"mayfly-test-{uuid.uuid4().hex[:12]}"  # auto-created on first use
    key, value = b"demo", os.urandom(32) + b"\x00end"

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        sent = producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"mayfly-test-{uuid.uuid4().hex[:12]}",
        auto_offset_reset="earliest",
    )
    received = []
    try:
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(records)
    finally:
        consumer.close()
    assert [(r.partition, r.offset, r.key, r.value) for r in received] == [
        (sent.partition, sent.offset, key, value)
    ]


def _read_all(bootstrap: str, topic: str, group: str) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[bytes] = []
    try:
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(r.value for r in records)
        if received:
            consumer.commit()
    finally:
        consumer.close()
    return received


# kafka-python can drop a connected socket without closing it when the broker
# dies under one of its connections (here the group coordinator's): the kill is
# the point of this test, so that leak is collected and ignored here instead of
# surfacing in whichever later test the garbage collector happens to run in.
@pytest.mark.kafka
@pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"
)
def test_a_killed_broker_restarts_on_its_data(kafka_bootstrap: str) -> None:
    topic = f"mayfly-test-{uuid.uuid4().hex[:12]}"
    group = f"mayfly-test-{uuid.uuid4().hex[:12]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        producer.send(topic, value=b"before").get(timeout=30)
    finally:
        producer.close()
    assert _read_all(kafka_bootstrap, topic, group) == [b"before"]  # and committed

    restart = [sys.executable, str(SERVICES), "restart", "kafka", "--kill", "--down-s", "1"]
    subprocess.run(restart, check=True, timeout=180)

    # The record is still there, and so is the group's commit past it.
    assert _read_all(kafka_bootstrap, topic, f"{group}-new") == [b"before"]
    assert _read_all(kafka_bootstrap, topic, group) == []
    gc.collect()


@pytest.mark.jaeger
def test_jaeger_stores_an_otlp_span_and_returns_it(jaeger: JaegerServer) -> None:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    now = time.time_ns()
    span = {
        "traceId": trace_id,
        "spanId": span_id,
        "name": "mayfly-test-span",
        "kind": 1,
        "startTimeUnixNano": str(now - 5_000_000),
        "endTimeUnixNano": str(now),
        "attributes": [{"key": "mayfly.test", "value": {"stringValue": "yes"}}],
    }
    export = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "mayfly-test"}}]
                },
                "scopeSpans": [{"scope": {"name": "tests"}, "spans": [span]}],
            }
        ]
    }
    with requests.Session() as http:
        posted = http.post(f"{jaeger.otlp_endpoint}/v1/traces", json=export, timeout=10)
        assert posted.status_code == 200, posted.text

        # Spans are batched before they reach the store: poll for a few seconds.
        deadline = time.monotonic() + 10
        while True:
            found = http.get(f"{jaeger.query_url}/api/traces/{trace_id}", timeout=10)
            if found.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert found.status_code == 200, found.text
    (trace,) = found.json()["data"]
    assert trace["traceID"] == trace_id
    assert [(s["spanID"], s["operationName"]) for s in trace["spans"]] == [
        (span_id, "mayfly-test-span")
    ]
    (process,) = trace["processes"].values()
    assert process["serviceName"] == "mayfly-test"


WEBHOOK_PORTS = {8443, 8444, 8445, 18008, 18009, 18010}  # services/knative.py: serving, ...


def _listeners(net: Path) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket in /proc/<pid>/net/tcp{,6}."""
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        with contextlib.suppress(FileNotFoundError):
            for line in (net / name).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A":  # LISTEN
                    address, port = local.split(":")
                    found.add((address if len(address) == width else "?", int(port, 16)))
    return found


def test_knatives_webhooks_listen_only_in_their_own_network_namespace(
    knative_webhooks: Path,
) -> None:
    # knative_webhooks is the services' logs folder; the relay records its children's pids
    # in the service's data folder beside it.
    pids = json.loads((knative_webhooks.parent / "data" / "knative" / "children.json").read_text())
    assert set(pids) == {"serving", "eventing", "kafka"}
    ours = os.readlink("/proc/self/ns/net")
    loopback = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
    own_ports = {"serving": 8443, "eventing": 8444, "kafka": 8445}
    for name, pid in pids.items():
        # In another network namespace than the host's...
        assert os.readlink(f"/proc/{pid}/ns/net") != ours, name
        # ...where each listens on every interface, as Knative's webhooks do.
        wildcard = {p for a, p in _listeners(Path(f"/proc/{pid}/net")) if a.strip("0") == ""}
        assert own_ports[name] in wildcard, (name, wildcard)
    # On the host, the webhooks' ports are only the relays', on 127.0.0.1.
    relays = set(own_ports.values())
    host = {(a, p) for a, p in _listeners(Path("/proc/self/net")) if p in relays}
    assert {p for _, p in host} == relays
    assert {a for a, _ in host} == {loopback}


def _services_modules() -> tuple[Any, Any, Any]:
    sys.path.insert(0, str(SERVICES.parent))
    try:
        import services.__main__ as main
        from services import base, manager
    finally:
        sys.path.remove(str(SERVICES.parent))
    return main, base, manager


def test_up_passes_over_a_service_this_machine_cannot_run_unless_in_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main, base, manager = _services_modules()

    class Unrunnable(base.Service):  # type: ignore[misc]  # base is imported at run time
        name, port, ports = "unrunnable", 1, {}

        def unavailable(self) -> str | None:
            return "it needs something this machine lacks"

        def command(self, paths: Any) -> list[str]:
            raise AssertionError("never started")

        def exports(self) -> dict[str, str]:
            return {}

        def probe(self) -> str | None:
            return None

    runner = manager.Manager(tmp_path)
    monkeypatch.delenv("CI", raising=False)
    assert main._up(runner, [Unrunnable()]) == []
    assert "unrunnable: passed over: it needs something this machine lacks" in (
        capsys.readouterr().err
    )
    monkeypatch.setenv("CI", "true")
    with pytest.raises(base.ServiceError, match="cannot run here: it needs something"):
        main._up(runner, [Unrunnable()])
