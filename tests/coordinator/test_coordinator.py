"""The coordinator against a simulated fleet: what devices really saw, and the result."""

from __future__ import annotations

import re
import time
from pathlib import Path

from mayfly.events import DeviceStatus, OverallStatus, TaskCompleted, TaskRejected, new_request
from mayfly.packages import digest_of

from .conftest import Env, FleetFactory, write_package

MISBEHAVE = """
import os, signal

def run(ctx):
    if ctx.device.id == "sim-0001":
        while True:          # never returns, never calls the device
            pass
    if ctx.device.id == "sim-0002":
        hog = bytearray(4 * 1024 ** 3)   # 4 GiB
        return len(hog)
    if ctx.device.id == "sim-0003":
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.device.state()["boot_count"]
"""


def test_firmware_update_with_broken_devices_matches_the_fleet(
    env: Env, fleet: FleetFactory
) -> None:
    server = fleet(50, broken=0.2, failure_rate=0.05, seed=7)
    sim = server.simulator
    request = new_request(
        "firmware-update",
        selector={"model": "m1"},
        devices=[f"sim-{i:04d}" for i in range(1, 51)],
        params={"version": "2.0.0"},
    )
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    by_id = {d.device_id: d for d in outcome.devices}
    assert len(by_id) == 50
    broken = set(sim.broken_ids)
    assert len(broken) == 10
    retries = 2  # firmware-update's manifest
    for device_id, result in by_id.items():
        records = sim.records(device_id)
        running = records["state"]["firmware"]["version"]
        if device_id in broken:
            assert result.status is DeviceStatus.FAILED, result
            assert result.attempts == retries + 1
            # The last answer was the device fault, or an injected 503 in front of it.
            assert re.search(r"500 \(device fault\)|503 \(injected failure\)", result.error or "")
            assert records["log"] == []
            assert running == "1.0.0"
        else:
            assert result.status is DeviceStatus.SUCCEEDED, result
            assert result.output == {"from": "1.0.0", "to": "2.0.0", "changed": True}
            assert running == "2.0.0"
            actions = [entry["action"] for entry in records["log"]]
            assert actions == ["firmware-download", "firmware-install", "reboot"]
    assert sim.duplicates() == []
    assert outcome.status is OverallStatus.PARTIAL
    assert sim.summary()["firmware"] == {"1.0.0": 10, "2.0.0": 40}


def test_runaway_package_code_is_contained(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    sim = fleet(4).simulator
    manifest = {
        "name": "misbehave",
        "version": "1.0.0",
        "entrypoint": "task:run",
        "limits": {
            "timeout_s": 60,
            "device_timeout_s": 2,
            "memory_mb": 256,
            "retries": 0,
            "max_parallel": 4,
        },
    }
    env.publish(write_package(tmp_path / "misbehave", manifest, MISBEHAVE))
    request = new_request("misbehave", devices=["sim-0001", "sim-0002", "sim-0003", "sim-0004"])
    begin = time.monotonic()
    outcome = env.coordinator().handle(request)
    elapsed = time.monotonic() - begin
    assert isinstance(outcome, TaskCompleted), outcome
    status = {d.device_id: d for d in outcome.devices}
    assert status["sim-0001"].status is DeviceStatus.TIMED_OUT
    assert "per-device timeout of 2 s" in (status["sim-0001"].error or "")
    assert status["sim-0002"].status is DeviceStatus.FAILED
    assert "memory limit of 256 MB" in (status["sim-0002"].error or "")
    assert status["sim-0003"].status is DeviceStatus.FAILED
    assert "task process died (SIGKILL" in (status["sim-0003"].error or "")
    assert status["sim-0004"].status is DeviceStatus.SUCCEEDED
    assert status["sim-0004"].output == sim.records("sim-0004")["state"]["boot_count"]
    assert elapsed < 10, elapsed
    assert outcome.status is OverallStatus.PARTIAL


def test_retries_stop_at_the_manifest_limit(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    server = fleet(2, broken=["sim-0002"])
    manifest = {
        "name": "poke",
        "version": "1.0.0",
        "entrypoint": "task:run",
        "limits": {"retries": 3, "device_timeout_s": 5},
    }
    code = "def run(ctx):\n    return ctx.device.action('config-push', {'config': {}})\n"
    env.publish(write_package(tmp_path / "poke", manifest, code))
    outcome = env.coordinator().handle(new_request("poke", devices=["sim-0001", "sim-0002"]))
    assert isinstance(outcome, TaskCompleted)
    results = {d.device_id: d for d in outcome.devices}
    assert results["sim-0001"].attempts == 1
    assert results["sim-0002"].attempts == 4
    # The driver's own count of its tries within the last attempt, see below.
    assert "500 (device fault) after 4 attempts" in (results["sim-0002"].error or "")
    # A broken device answers every arrival 500 (device fault) without looking at it. The
    # coordinator made 4 attempts (retries: 3), each with the same Idempotency-Key, and in
    # each the HttpDriver tried 4 times (its default retries=3; 500 is retried, and its
    # backoff, 0.1 + 0.2 + 0.4 s, is well inside device_timeout_s): one key, 4 x 4 arrivals,
    # every one refused and none applied.
    records = server.simulator.records("sim-0002")
    assert list(records["arrivals"].values()) == [4 * 4]
    assert records["rejected"] == records["arrivals"]
    assert records["log"] == []


def test_missing_capability_is_skipped(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    fleet(2)
    manifest = {
        "name": "needs-gps",
        "version": "1.0.0",
        "entrypoint": "task:run",
        "capabilities": ["gps"],
    }
    env.publish(write_package(tmp_path / "gps", manifest, "def run(ctx):\n    return 1\n"))
    outcome = env.coordinator().handle(new_request("needs-gps", devices=["sim-0001"]))
    assert isinstance(outcome, TaskCompleted)
    assert outcome.devices[0].status is DeviceStatus.SKIPPED
    assert "lacks capabilities: gps" in (outcome.devices[0].error or "")
    assert outcome.status is OverallStatus.FAILED


def test_bad_requests_are_rejected_with_the_reason(env: Env, fleet: FleetFactory) -> None:
    fleet(3)
    core = env.coordinator()
    unknown_task = core.handle(new_request("teleport", devices=["sim-0001"]))
    assert isinstance(unknown_task, TaskRejected)
    assert unknown_task.code == "unknown_task"
    assert "teleport" in unknown_task.reason

    unknown_device = core.handle(new_request("reboot", devices=["sim-0001", "ghost-9"]))
    assert isinstance(unknown_device, TaskRejected)
    assert unknown_device.code == "unknown_device"
    assert "ghost-9" in unknown_device.reason

    bad_params = core.handle(
        new_request("config-push", devices=["sim-0001"], params={"config": {"log_level": "loud"}})
    )
    assert isinstance(bad_params, TaskRejected)
    assert bad_params.code == "invalid_params"
    assert bad_params.field == "params.config.log_level"

    no_match = core.handle(new_request("reboot", selector={"site": "mars"}))
    assert isinstance(no_match, TaskRejected)
    assert no_match.code == "unknown_device"

    store = env.home / "packages" / "reboot" / "1.0.0" / "package.tar.gz"
    original = store.read_bytes()
    data = bytearray(original)
    data[-5] ^= 1
    store.write_bytes(bytes(data))
    # Versions are immutable: a coordinator that verified this one runs the
    # verified bytes; one that did not (a new process) refuses the rewrite.
    verified = core.handle(new_request("reboot", devices=["sim-0001"]))
    assert isinstance(verified, TaskCompleted), verified
    assert verified.package.digest == digest_of(original)
    tampered = env.coordinator().handle(new_request("reboot", devices=["sim-0001"]))
    assert isinstance(tampered, TaskRejected)
    assert tampered.code == "integrity"
    assert "reboot 1.0.0" in tampered.reason
