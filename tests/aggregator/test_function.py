"""The Knative aggregator function, driven through functions-framework's test client."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from mayfly.aggregator import LocalResultArchive
from mayfly.events import new_request, to_http

from .conftest import TRACE_ID, result

SOURCE = Path(__file__).parents[2] / "functions" / "aggregator" / "main.py"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def client(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    # No MAYFLY_* or OTEL_* of the developer's: tests/conftest.py's isolated_environment.
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    app = create_app(target="aggregator", source=str(SOURCE))
    yield app.test_client()
    # functions-framework registers the module as "main"; stop its exporter thread.
    sys.modules["main"].service().close()


def _flush() -> None:
    assert sys.modules["main"].service().flush()


def test_a_binary_mode_result_is_accepted_traced_and_archived(
    client: FlaskClient, home: Path
) -> None:
    completed = result("req-fn")
    headers, body = to_http(completed, "binary")
    assert "ce-id" in headers  # binary mode: attributes in headers
    response = client.post("/", headers=headers, data=body)
    assert response.status_code == 202
    assert response.data == b""

    _flush()
    lines = (home / "telemetry" / "traces.jsonl").read_text().splitlines()
    spans = [
        span
        for line in lines
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]
    assert {s["traceId"] for s in spans} == {TRACE_ID}
    assert sorted(s["name"] for s in spans) == [
        "device sim-0001",
        "device sim-0002",
        "process mayfly.requests.normal",
        "task reboot",
    ]
    root = next(s for s in spans if s["name"] == "process mayfly.requests.normal")
    attributes = {a["key"]: a["value"] for a in root["attributes"]}
    assert attributes["messaging.system"] == {"stringValue": "kafka"}
    assert [e.request_id for e in LocalResultArchive(home / "archive").read()] == ["req-fn"]

    again = client.post("/", headers=headers, data=body)  # a redelivery
    assert (again.status_code, again.data) == (202, b"")


def test_undecodable_input_is_a_400_for_the_dead_letter_sink(client: FlaskClient) -> None:
    response = client.post("/", headers={"content-type": "text/plain"}, data=b"hello")
    assert (response.status_code, response.data) == (400, b"")
    bad = client.post(
        "/",
        headers={"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "nope"},
        data=b"{}",
    )
    assert (bad.status_code, bad.data) == (400, b"")


def test_a_request_on_a_shared_broker_is_not_ours(client: FlaskClient, home: Path) -> None:
    headers, body = to_http(new_request("reboot", devices=["sim-0001"]), "structured")
    response = client.post("/", headers=headers, data=body)
    assert (response.status_code, response.data) == (202, b"")
    assert list(LocalResultArchive(home / "archive").read()) == []
