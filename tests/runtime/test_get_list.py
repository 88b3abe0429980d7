"""``mayfly get`` and ``mayfly list``: requests as the log tells them, on SQLite and Kafka.

A real ``mayfly up`` runs the requests; the commands then run as a user runs
them, in their own processes, after the runtime has stopped: what they show
comes from the log alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest
import yaml

from tests.runtime.conftest import Home


@pytest.fixture(params=["sqlite", "kafka"])
def log_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    return {
        "MAYFLY_EVENT_LOG": f"kafka://{bootstrap}",
        "MAYFLY_TOPIC_PREFIX": f"g{uuid.uuid4().hex[:8]}",
    }


def _mayfly(home: Home, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", *args],
        env=home.env(**env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _published_id(run: subprocess.CompletedProcess[str]) -> str:
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("published "))
    return line.split()[1]


def _json(run: subprocess.CompletedProcess[str]) -> Any:
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_get_and_list_tell_each_requests_state_after_the_runtime_stopped(
    home: Home, fleet, log_env: dict[str, str]
) -> None:
    fleet(3, broken=["sim-0002"])
    # Published before any runtime: it waits in its lane, and publish says so.
    first = _mayfly(home, log_env, "publish", "reboot", "-d", "sim-0003")
    queued = _published_id(first)
    waits = "served the lanes of prefix" if log_env else "no runtime has opened"
    assert "note: no runtime has " in first.stderr, first.stderr
    assert waits in first.stderr, first.stderr
    pending = _json(_mayfly(home, log_env, "get", queued, "-o", "json"))
    assert pending["state"] == "pending"
    assert pending["request"]["devices"] == ["sim-0003"]

    up = home.up_with(output=home.root.parent / "up.log", **log_env)
    partial = _mayfly(
        home, log_env, "publish", "--wait", "reboot", "-d", "sim-0001", "-d", "sim-0002"
    )
    rejected = _mayfly(
        home, log_env, "publish", "--wait", "--no-validate",
        "config-push", "-d", "sim-0003", "-p", "config=7",
    )  # fmt: skip
    assert partial.returncode == 3, partial.stdout + partial.stderr
    assert rejected.returncode == 5, rejected.stdout + rejected.stderr
    assert _mayfly(home, log_env, "publish", "--wait", "--timeout", "120", "reboot",
                   "-d", "sim-0001").returncode == 0  # fmt: skip
    up.terminate()  # SIGINT is ignored by a runtime started in the background
    up.wait(timeout=60)

    partial_id, rejected_id = _published_id(partial), _published_id(rejected)
    got = _json(_mayfly(home, log_env, "get", partial_id, "-o", "json"))
    assert got["state"] == "partial"
    assert got["devices"] == {"failed": 1, "succeeded": 1}
    by_device = {d["device_id"]: d for d in got["outcome"]["devices"]}
    assert by_device["sim-0001"]["status"] == "succeeded"
    assert by_device["sim-0002"]["status"] == "failed"
    assert by_device["sim-0002"]["error"]
    assert got["outcome"]["package"]["version"] == "1.0.0"
    assert got["outcome"]["package"]["digest"].startswith("sha256:")
    assert len(got["trace_id"]) == 32

    table = _mayfly(home, log_env, "get", partial_id, "--jaeger-url", "http://127.0.0.1:16686")
    assert table.returncode == 0, table.stderr
    assert "partial: 1 failed, 1 succeeded (of 2 devices)" in table.stdout
    assert f"http://127.0.0.1:16686/trace/{got['trace_id']}" in table.stdout
    rows = [ln.split() for ln in table.stdout.splitlines() if ln.startswith("sim-")]
    assert [r[:2] for r in rows] == [["sim-0002", "failed"], ["sim-0001", "succeeded"]]

    refused = yaml.safe_load(_mayfly(home, log_env, "get", rejected_id, "-o", "yaml").stdout)
    assert refused["state"] == "rejected"
    assert refused["outcome"]["code"] == "invalid_params"

    listed = _json(_mayfly(home, log_env, "list", "-o", "json"))
    assert [v["id"] for v in listed][-1] == queued  # newest first: the first published is last
    states = {v["id"]: v["state"] for v in listed}
    assert states[queued] == "succeeded"  # the runtime ran it once it started
    assert states[partial_id] == "partial"
    assert states[rejected_id] == "rejected"
    assert len(listed) == 4
    only = _json(_mayfly(home, log_env, "list", "--status", "rejected", "-o", "json"))
    assert [v["id"] for v in only] == [rejected_id]
    reboots = _mayfly(home, log_env, "list", "--task", "reboot", "--limit", "2")
    assert reboots.returncode == 0, reboots.stderr
    assert len(reboots.stdout.splitlines()) == 3  # the header and two rows
    assert "1 more: --limit 0 shows all" in reboots.stderr

    missing = _mayfly(home, log_env, "get", "no-such-request")
    assert missing.returncode == 1
    assert "no request 'no-such-request' in" in missing.stderr
