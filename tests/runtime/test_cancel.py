"""``mayfly cancel`` on a real ``mayfly up``, on SQLite and on Kafka.

A running request over 100 devices whose package ignores ``ctx.cancelled()``
is stopped: its queued devices are skipped, its running ones killed at the
end of the grace period, and no device is reached after that. A request
queued behind another (same device, same partition key), and one canceled
before any runtime was up, never start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mayfly.testing import publish_folders
from tests.coordinator.conftest import write_package
from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]

STUBBORN = """
import time

def run(ctx):
    while True:                      # never looks at ctx.cancelled()
        ctx.device.state()
        time.sleep(0.05)
"""


def _stubborn(home: Home, tmp_path: Path) -> None:
    manifest = {
        "name": "stubborn",
        "version": "1.0.0",
        "entrypoint": "task:run",
        "limits": {"timeout_s": 300, "device_timeout_s": 240, "max_parallel": 10},
    }
    publish_folders(home.settings(), [write_package(tmp_path / "stubborn", manifest, STUBBORN)])


def _until_running(home: Home, env: dict[str, str], request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = _json(_mayfly(home, env, "get", request_id, "-o", "json"))
        if got["state"] == "running":
            return dict(got)
        assert got["state"] == "pending", got["state"]
        time.sleep(0.2)
    raise AssertionError(f"{request_id} did not start")


def test_a_running_request_is_stopped_and_no_device_is_reached_after_the_grace(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(100)
    _stubborn(home, tmp_path)
    up = home.up_with(output=tmp_path / "up.log", **log_env)
    devices = [arg for i in range(1, 101) for arg in ("-d", f"sim-{i:04d}")]
    request_id = _published_id(_mayfly(home, log_env, "publish", "stubborn", *devices))
    _until_running(home, log_env, request_id)

    canceled = _mayfly(home, log_env, "cancel", request_id, "--grace", "1s", "--reason",
                       "wrong fleet", "--wait", "--timeout", "120")  # fmt: skip
    assert canceled.returncode == 4, canceled.stdout + canceled.stderr
    assert f"{request_id}: cancel published (running devices stop within 1 s)" in canceled.stdout
    assert "stubborn 1.0.0: canceled (10 canceled, 90 skipped)" in canceled.stdout

    got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
    assert got["state"] == "canceled"
    assert got["cancel"]["reason"] == "wrong fleet"
    assert got["cancel"]["grace_s"] == 1.0
    results = {d["device_id"]: d for d in got["outcome"]["devices"]}
    killed = [d for d, r in results.items() if r["status"] == "canceled"]
    assert len(killed) == 10
    errors = [results[d]["error"] for d in killed]
    # Killed at the end of the grace; or, if its device call was in flight at
    # the cancel, ended by the call given up ("the request was canceled").
    assert all(e.startswith("request canceled") for e in errors), errors
    assert any("end of the 1 s grace period" in e for e in errors), errors
    stopped_at = max(_epoch(results[d]["finished_at"]) for d in killed)
    records = {d: server.simulator.records(d) for d in results}
    touched = [r["last_request_at"] for r in records.values() if r["last_request_at"]]
    assert max(touched) <= stopped_at + 0.1, max(touched) - stopped_at
    skipped = [d for d, r in results.items() if r["status"] == "skipped"]
    assert len(skipped) == 90
    assert all(records[d]["last_request_at"] is None for d in skipped)  # never reached
    time.sleep(1.0)  # and nothing later either
    assert [server.simulator.records(d)["last_request_at"] for d in records] == [
        r["last_request_at"] for r in records.values()
    ]

    again = _mayfly(home, log_env, "cancel", request_id)
    assert again.returncode == 1
    assert f"{request_id} already ended (canceled): nothing to cancel" in again.stderr
    unknown = _mayfly(home, log_env, "cancel", "no-such-request")
    assert unknown.returncode == 1
    assert "no request 'no-such-request'" in unknown.stderr
    up.terminate()
    up.wait(timeout=60)


def test_queued_requests_canceled_never_start_even_before_a_runtime_is_up(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(2)
    _stubborn(home, tmp_path)

    def push(device: str, interval: int) -> str:
        run = _mayfly(home, log_env, "publish", "config-push", "-d", device,
                      "-p", f'config={{"telemetry_interval_s": {interval}}}')  # fmt: skip
        return _published_id(run)

    early = push("sim-0002", 99)
    before = _mayfly(home, log_env, "cancel", early)
    assert before.returncode == 0, before.stderr
    waiting = _json(_mayfly(home, log_env, "get", early, "-o", "json"))
    assert waiting["state"] == "pending"
    assert waiting["cancel"]["grace_s"] == 10.0

    up = home.up_with(output=tmp_path / "up.log", **log_env)
    blocker = _published_id(_mayfly(home, log_env, "publish", "stubborn", "-d", "sim-0001"))
    behind = push("sim-0001", 77)  # same device: queued until the blocker ends
    _until_running(home, log_env, blocker)
    ended = _mayfly(home, log_env, "cancel", behind, "--wait", "--timeout", "60")
    assert ended.returncode == 4, ended.stdout + ended.stderr
    assert "config-push: canceled (canceled before it started)" in ended.stdout
    assert _json(_mayfly(home, log_env, "get", blocker, "-o", "json"))["state"] == "running"

    stopped = _mayfly(home, log_env, "cancel", blocker, "--now", "--wait", "--timeout", "60")
    assert stopped.returncode == 4, stopped.stdout + stopped.stderr
    assert "running devices stop at once" in stopped.stdout
    for request_id in (early, behind):
        got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
        assert got["state"] == "canceled"
        assert got["outcome"]["code"] == "canceled"
    listed = _json(_mayfly(home, log_env, "list", "--status", "canceled", "-o", "json"))
    assert {v["id"] for v in listed} == {early, behind, blocker}
    up.terminate()
    up.wait(timeout=60)
    # Neither ever reached its device.
    assert server.simulator.records("sim-0002")["last_request_at"] is None
    assert server.simulator.records("sim-0001")["state"]["config"]["telemetry_interval_s"] != 77
    assert server.simulator.records("sim-0001")["log"] == []


def _epoch(moment: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
