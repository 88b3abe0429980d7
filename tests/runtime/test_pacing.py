"""A paced rollout on a real ``mayfly up`` (SQLite and Kafka): 2,000 devices at
600 a minute take the 200 s the rate says, even when the coordinator running
them is killed mid-way; the one that goes on after it runs only the devices
not ended (it reads their checkpoints back from the log), and every device
is changed once. An exponential ramp doubles its pace after each step of
successes, as ``mayfly plan`` says it will."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from tests.runtime.conftest import Home
from tests.runtime.test_chaos import _roles
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]

DEVICES = 2000
PER_MINUTE = 600
EXPECTED_S = (DEVICES - 1) * 60 / PER_MINUTE  # 199.9 s from the first start to the last


def test_a_paced_rollout_keeps_its_rate_when_its_coordinator_is_killed(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(DEVICES)
    ids = server.simulator.device_ids()
    spec = tmp_path / "rollout.json"
    spec.write_text(
        json.dumps(
            {
                "task": "config-push",
                "devices": ids,
                "params": {"config": {"telemetry_interval_s": 42}},
                "rollout": {"rate_per_minute": PER_MINUTE, "max_parallel": 8},
            }
        )
    )
    planned = _mayfly(home, log_env, "plan", "--file", str(spec))
    assert planned.returncode == 0, planned.stderr
    assert "600 devices a minute" in planned.stdout
    assert "3 min 20 s to start every device" in planned.stdout
    planned_json = _json(_mayfly(home, log_env, "plan", "--file", str(spec), "-o", "json"))
    assert planned_json[0]["pace"]["start_span_s"] == EXPECTED_S

    up = home.up_with(output=tmp_path / "up.log", **log_env)
    started = time.monotonic()
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mayfly.cli",
            "publish",
            "--file",
            str(spec),
            "--wait",
            "--timeout",
            str(int(EXPECTED_S * 2)),
        ],
        env=home.env(**log_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Mid-way: kill the coordinator running it, as an OOM kill would.
        killed_at_devices = 0
        while time.monotonic() - started < EXPECTED_S / 2:
            time.sleep(1.0)
        coordinators = _roles(up.pid)["coordinator"]
        assert coordinators, "no coordinator running mid-way"
        killed_at_devices = sum(
            server.simulator.records(d)["last_request_at"] is not None for d in ids
        )
        for pid in coordinators:
            os.kill(pid, signal.SIGKILL)
        out, err = waiting.communicate(timeout=EXPECTED_S * 2 + 30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    took = time.monotonic() - started
    assert waiting.returncode == 0, out + err
    assert 0.25 * DEVICES < killed_at_devices < 0.75 * DEVICES, killed_at_devices
    # The rate holds across the kill: within 20 % of what it says.
    assert 0.8 * EXPECTED_S <= took <= 1.2 * EXPECTED_S, took

    request_id = _published_id(subprocess.CompletedProcess([], 0, out, err))
    got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
    devices = got["outcome"]["devices"]
    assert len(devices) == DEVICES
    assert all(d["status"] == "succeeded" for d in devices)
    # Changed once each: the devices ended before the kill were not run again,
    # and the few in flight then were sent the same idempotency key.
    for device in ids:
        records = server.simulator.records(device)
        assert len(records["log"]) == 1, (device, records["log"])
    up.send_signal(signal.SIGTERM)
    up.wait(timeout=30)
    log = (tmp_path / "up.log").read_text()
    assert "going on after an earlier coordinator" in log, log[-3000:]


def test_an_exponential_ramp_doubles_after_each_step_of_successes_as_planned(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    """12 devices from 60 a minute, doubled after every 4 successes: 4 starts a
    second apart, 4 half a second apart, 4 a quarter apart, as `mayfly plan`
    says; measured on the starts of a real `mayfly up`."""
    server = fleet(12)
    ramp = {"base_per_minute": 60, "increment_factor": 2, "increase_after": 4}
    spec = tmp_path / "ramp.json"
    spec.write_text(
        json.dumps(
            {
                "task": "reboot",
                "devices": server.simulator.device_ids(),
                "rollout": {"ramp": ramp, "max_parallel": 4},
            }
        )
    )
    planned = _json(_mayfly(home, log_env, "plan", "--file", str(spec), "-o", "json"))
    steps = [(s["devices"], s["per_minute"]) for s in planned[0]["pace"]["steps"]]
    assert steps == [(4, 60.0), (4, 120.0), (4, 240.0)]
    span = planned[0]["pace"]["start_span_s"]
    assert span == 4 * 1.0 + 4 * 0.5 + 3 * 0.25  # no wait after the last start

    up = home.up_with(output=tmp_path / "up.log", **log_env)
    try:
        ran = _mayfly(home, log_env, "publish", "--file", str(spec), "--wait", "--timeout", "60")
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    got = _json(_mayfly(home, log_env, "get", _published_id(ran), "-o", "json"))
    starts = sorted(datetime.fromisoformat(d["started_at"]) for d in got["outcome"]["devices"])
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    # Within each step (the gap into a step waits on the successes before it).
    for first, expected in ((0, 1.0), (5, 0.5), (9, 0.25)):
        inside = gaps[first : first + 3] if first == 0 else gaps[first : first + 2]
        mean = sum(inside) / len(inside)
        assert 0.8 * expected <= mean <= 1.3 * expected, (expected, gaps)
    took = (starts[-1] - starts[0]).total_seconds()
    assert 0.8 * span <= took <= 1.3 * span, (took, span, gaps)
