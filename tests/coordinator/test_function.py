"""The Knative function, driven through functions-framework's own test client."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from mayfly.events import from_http, new_request, to_http

from .conftest import Env, FleetFactory

SOURCE = Path(__file__).parents[2] / "functions" / "coordinator" / "main.py"


@pytest.fixture
def client_for(env: Env, monkeypatch: pytest.MonkeyPatch) -> Callable[..., FlaskClient]:
    def make(**variables: str) -> FlaskClient:
        for name, value in (env.variables() | variables).items():
            monkeypatch.setenv(name, value)
        return create_app(target="coordinator", source=str(SOURCE)).test_client()

    return make


def test_reply_is_the_result_cloudevent(
    client_for: Callable[..., FlaskClient], fleet: FleetFactory
) -> None:
    fleet(3)
    client = client_for(MAYFLY_RESULT_SINK="-")
    headers, body = to_http(new_request("reboot", devices=["sim-0001", "sim-0003"]), "binary")
    response = client.post("/", headers=headers, data=body)
    assert response.status_code == 200
    assert response.headers["ce-type"] == "dev.mayfly.task.completed"
    assert response.headers["ce-specversion"] == "1.0"
    data = json.loads(response.data)
    assert [d["status"] for d in data["devices"]] == ["succeeded", "succeeded"]


def test_with_a_sink_the_answer_is_an_empty_202(
    client_for,
    env: Env,
    fleet: FleetFactory,
) -> None:
    fleet(1)
    client = client_for()
    headers, body = to_http(new_request("reboot", devices=["sim-0001"]), "structured")
    response = client.post("/", headers=headers, data=body)
    assert response.status_code == 202
    assert response.data == b""
    [event] = env.result_events()
    assert event["type"] == "dev.mayfly.task.completed"


def test_garbage_is_answered_with_a_rejection_event_not_text(
    client_for: Callable[..., FlaskClient],
) -> None:
    client = client_for(MAYFLY_RESULT_SINK="-")
    response = client.post("/", data=b"OK", headers={"content-type": "text/plain"})
    assert response.status_code == 200
    assert response.headers["ce-type"] == "dev.mayfly.task.rejected"
    assert json.loads(response.data)["code"] == "not_a_cloudevent"


class _Lanes(http.server.BaseHTTPRequestHandler):
    """What a KafkaSink's ingress does with a POST: takes it, 202. (The ingress
    itself needs a cluster; this real HTTP peer stands in for it.)"""

    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, dict(self.headers), body))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_function_publishes_the_shards_of_a_large_request_to_their_lane(
    client_for: Callable[..., FlaskClient], env: Env, fleet: FleetFactory
) -> None:
    fleet(5)
    lanes = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lanes)
    threading.Thread(target=lanes.serve_forever, daemon=True).start()
    try:
        port = lanes.server_address[1]
        client = client_for(
            MAYFLY_SHARD_SIZE="2",
            MAYFLY_SHARD_SINK=f"http://127.0.0.1:{port}/mayfly/mayfly-requests-{{priority}}",
        )
        request = new_request("reboot", selector={"ring": "main"}, priority="low")
        headers, body = to_http(request, "binary")
        response = client.post("/", headers=headers, data=body)
    finally:
        lanes.shutdown()
        lanes.server_close()
    assert (response.status_code, response.data) == (202, b"")
    assert [path for path, _, _ in _Lanes.received] == ["/mayfly/mayfly-requests-low"] * 2
    shards = [from_http(h, b) for _, h, b in _Lanes.received]
    assert [s.id for s in shards] == [f"{request.id}#shard-{i}" for i in range(2)]
    assert env.result_events() == []  # each shard's coordinator delivers its own
