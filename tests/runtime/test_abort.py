"""An aborted rollout on a real ``mayfly up`` (SQLite and Kafka): 30 % of the
fleet broken, an abort at 10 % after 50 devices. It stops with fewer than 100
devices touched, and its rollback runs on the devices it had changed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]


def test_an_aborted_rollout_stops_early_and_rolls_back_what_it_changed(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(200, broken=0.3, seed=5)
    ids = server.simulator.device_ids()
    rollout = {
        "task": "config-push",
        "devices": ids,
        "params": {"config": {"telemetry_interval_s": 99}},
        "rollout": {
            "max_parallel": 10,
            "abort": {"outcome": "failed", "threshold_pct": 10, "min_devices": 50},
            "on_abort": {"task": "config-push", "params": {"config": {"telemetry_interval_s": 5}}},
        },
    }
    spec = tmp_path / "rollout.json"
    spec.write_text(json.dumps(rollout))
    up = home.up_with(output=tmp_path / "up.log", **log_env)

    planned = _mayfly(home, log_env, "plan", "--file", str(spec))
    assert planned.returncode == 0, planned.stderr
    assert (
        "stops once 10 % of the devices that ran failed, after 50 ran in a coordinator;"
        " then config-push (its stable channel) runs on the devices it changed"
    ) in planned.stdout
    ran = _mayfly(home, log_env, "publish", "--file", str(spec), "--wait", "--timeout", "120")
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert "rollout aborted: " in ran.stdout
    request_id = _published_id(ran)

    got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
    assert "abort at 10 % once 50 ran" in got["outcome"]["aborted"]
    results = {d["device_id"]: d for d in got["outcome"]["devices"]}
    changed = sorted(d for d, r in results.items() if r["status"] == "succeeded")
    touched = [d for d in ids if server.simulator.records(d)["last_request_at"] is not None]
    assert len(touched) < 100, len(touched)
    assert changed

    # The rollback: a request of its own, over the devices it changed only.
    deadline = time.monotonic() + 60
    rollback = None
    while time.monotonic() < deadline:
        listed = _json(_mayfly(home, log_env, "list", "-o", "json"))
        others = [v for v in listed if v["id"] != request_id]
        if others and others[0]["state"] not in ("pending", "running"):
            rollback = others[0]
            break
        time.sleep(0.5)
    assert rollback is not None, "no rollback ran"
    assert rollback["state"] == "succeeded", rollback
    assert sorted(rollback["request"]["devices"]) == changed
    assert rollback["priority"] == got["priority"]
    for device in changed:
        records = server.simulator.records(device)
        assert records["state"]["config"]["telemetry_interval_s"] == 5
        assert [e["payload"]["config"] for e in records["log"]] == [
            {"telemetry_interval_s": 99},
            {"telemetry_interval_s": 5},
        ]
    for device in set(ids) - set(touched):
        assert server.simulator.records(device)["log"] == []
    up.terminate()
    up.wait(timeout=30)


def test_an_abort_in_one_shard_stops_every_shard_and_each_rolls_back(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    """Four shards of 50 at a shared pace; only the first shard's devices are
    broken (every other one), so only it meets the abort criteria. Its abort
    stops the other three mid-way: they end aborted, each rolls back the
    devices it changed, and most of their devices are never touched."""
    first = [f"sim-{i:04d}" for i in range(1, 51)]
    server = fleet(200, broken=first[1::2])
    ids = server.simulator.device_ids()
    spec = tmp_path / "rollout.json"
    spec.write_text(
        json.dumps(
            {
                "task": "config-push",
                "devices": ids,
                "params": {"config": {"telemetry_interval_s": 99}},
                "rollout": {
                    "shard_size": 50,
                    "rate_per_minute": 480,  # 2 a second in each of the 4 shards
                    "abort": {"outcome": "failed", "threshold_pct": 20, "min_devices": 10},
                    "on_abort": {
                        "task": "config-push",
                        "params": {"config": {"telemetry_interval_s": 5}},
                    },
                },
            }
        )
    )
    up = home.up_with(output=tmp_path / "up.log", **log_env)
    try:
        ran = _mayfly(home, log_env, "publish", "--file", str(spec), "--wait", "--timeout", "120")
        assert "rollout aborted: " in ran.stdout, ran.stdout + ran.stderr
        request_id = _published_id(ran)
        got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
        results = {d["device_id"]: d for d in got["outcome"]["devices"]}
        changed = sorted(d for d, r in results.items() if r["status"] == "succeeded")
        touched = [d for d in ids if server.simulator.records(d)["last_request_at"]]
        # The first shard aborts after 10 devices (about 5 s in): the others
        # had started about as many each, of their 50.
        assert len(touched) < 100, len(touched)
        for shard in range(1, 4):
            mine = ids[shard * 50 : (shard + 1) * 50]
            assert any(d in touched for d in mine), shard  # it ran ...
            assert not all(d in touched for d in mine), shard  # ... and was stopped
        # Every changed device is rolled back, whichever shard changed it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            undone = [
                d
                for d in changed
                if server.simulator.records(d)["state"]["config"]["telemetry_interval_s"] == 5
            ]
            if len(undone) == len(changed):
                break
            time.sleep(0.5)
        assert sorted(undone) == changed
        assert any(d not in first for d in changed)  # the other shards' too
    finally:
        up.terminate()
        up.wait(timeout=30)
