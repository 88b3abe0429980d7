"""Job mode as Knative (or a person) runs it: `python -m mayfly.coordinator`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mayfly.deploy import DeployOptions, render_task
from mayfly.events import new_request, to_http
from mayfly.packages import load_manifest

from .conftest import Env, FleetFactory

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


def _job(env: Env, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=env.variables() | variables,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_firmware_update_on_50_devices(env: Env, fleet: FleetFactory) -> None:
    sim = fleet(50).simulator
    ids = ",".join(sim.device_ids())
    job = _job(
        env,
        TASK_TYPE="firmware-update",
        TASK_ID="req-fw-50",
        DEVICE_IDS=ids,
        TASK_PARAMS='{"version": "2.1.0"}',
    )
    assert job.returncode == 0, job.stderr
    assert "firmware-update 1.0.1: succeeded (50 succeeded)" in job.stderr
    assert sim.summary()["firmware"] == {"2.1.0": 50}
    [event] = env.result_events()
    assert event["type"] == "dev.mayfly.task.completed"
    data = event["data"]
    assert data["request_id"] == "req-fw-50"
    assert data["status"] == "succeeded"
    assert [d["status"] for d in data["devices"]] == ["succeeded"] * 50
    assert data["timings"]["cold_start_ms"] > 0
    assert data["coordinator"]["mode"] == "job"


def test_exit_codes_for_partial_and_rejected(env: Env, fleet: FleetFactory) -> None:
    fleet(4, broken=["sim-0002"])
    partial = _job(
        env,
        TASK_TYPE="config-push",
        DEVICE_SELECTOR="model=m2",
        TASK_PARAMS='{"config": {"log_level": "debug"}}',
    )
    assert partial.returncode == 3, partial.stderr
    assert "partial (1 failed, 1 succeeded)" in partial.stderr

    rejected = _job(
        env,
        TASK_TYPE="config-push",
        DEVICE_IDS="sim-0001",
        TASK_PARAMS='{"config": {"telemetry_interval_s": 1}}',
    )
    assert rejected.returncode == 5
    assert "rejected (invalid_params)" in rejected.stderr
    assert "params.config.telemetry_interval_s" in rejected.stderr
    assert "Traceback" not in rejected.stderr
    kinds = [e["type"] for e in env.result_events()]
    assert kinds == ["dev.mayfly.task.completed", "dev.mayfly.task.rejected"]

    missing = _job(env, DEVICE_IDS="sim-0001")
    assert missing.returncode == 5
    assert "TASK_TYPE" in missing.stderr


def test_request_from_a_cloudevent_file(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    fleet(2)
    request = new_request(
        "reboot",
        devices=["sim-0001", "sim-0002"],
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    _, body = to_http(request, "structured")
    event_file = tmp_path / "event"
    event_file.write_bytes(body)
    job = _job(env, K_EVENT_PATH=str(event_file))
    assert job.returncode == 0, job.stderr
    [event] = env.result_events()
    assert event["data"]["request_id"] == request.id
    assert event["traceparent"] == request.traceparent
    assert {d["status"] for d in event["data"]["devices"]} == {"succeeded"}


def test_request_from_the_folder_a_jobsink_mounts(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    """Knative's JobSink mounts the event as the file `event` of a folder and appends
    K_EVENT_PATH naming that folder to the Job's container, after the Job's own
    variables: the variables that win are the rendered JobSink's with that one last."""
    fleet(1)
    manifest = load_manifest(TASKPKGS / "reboot")
    rendered = next(r for r in render_task(manifest, DeployOptions(shape="job")))
    (container,) = rendered["spec"]["job"]["spec"]["template"]["spec"]["containers"]
    mount = tmp_path / "jobsink-event"
    mount.mkdir()
    request = new_request("reboot", devices=["sim-0001"])
    (mount / "event").write_bytes(to_http(request, "structured")[1])
    winning: dict[str, str] = {}
    for variable in [*container["env"], {"name": "K_EVENT_PATH", "value": str(mount)}]:
        if "value" in variable:
            winning[variable["name"]] = variable["value"]

    job = _job(env, TASK_TYPE=winning["TASK_TYPE"], K_EVENT_PATH=winning["K_EVENT_PATH"])
    assert job.returncode == 0, job.stderr
    [event] = env.result_events()
    assert event["data"]["request_id"] == request.id


def test_a_held_request_is_deferred_to_its_sink_or_exits_deferred(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    """A JobSink's Job for a request its schedule holds: to MAYFLY_DEFER_SINK,
    marked, then exit 0 (no retry); without one, exit 7 (DEFERRED), no result."""
    import threading
    from datetime import UTC, datetime, timedelta
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[dict[str, str]] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(dict(self.headers))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    fleet(1)
    opens = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    request = new_request(
        "reboot", devices=["sim-0001"], rollout={"schedule": {"not_before": opens.isoformat()}}
    )
    event_file = tmp_path / "event"
    event_file.write_bytes(to_http(request, "structured")[1])
    assert _job(env, K_EVENT_PATH=str(event_file)).returncode == 7
    server = HTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        job = _job(
            env,
            K_EVENT_PATH=str(event_file),
            MAYFLY_DEFER_SINK=f"http://127.0.0.1:{server.server_port}/",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert job.returncode == 0, job.stderr
    [headers] = received
    assert headers["ce-id"] == request.id
    assert headers["ce-notbefore"] == opens.isoformat()
    assert env.result_events() == []


def test_bad_configuration_exits_2(env: Env) -> None:
    job = _job(env, TASK_TYPE="reboot", MAYFLY_MAX_PROCESSES="zero")
    assert job.returncode == 2
    assert "MAYFLY_MAX_PROCESSES" in job.stderr


def test_http_sink_receives_a_binary_cloudevent(env: Env, fleet: FleetFactory) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    received: list[tuple[dict[str, str], bytes]] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        fleet(1)
        job = _job(
            env,
            TASK_TYPE="reboot",
            DEVICE_IDS="sim-0001",
            MAYFLY_RESULT_SINK="",
            K_SINK=f"http://127.0.0.1:{server.server_port}/",
        )
        assert job.returncode == 0, job.stderr
    finally:
        server.shutdown()
        server.server_close()
    [(headers, body)] = received
    assert headers["ce-type"] == "dev.mayfly.task.completed"
    assert json.loads(body)["status"] == "succeeded"
