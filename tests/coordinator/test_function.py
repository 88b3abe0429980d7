"""The Knative function, driven through functions-framework's own test client."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

from mayfly.events import new_request, to_http

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
