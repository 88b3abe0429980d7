"""A continuous request on a real ``mayfly up`` (SQLite and Kafka): it reaches
the devices that match its selector when it starts, then, held by the runtime
between its looks, a device added to the inventory later; each device runs
once, and the request ends with all of them at its schedule's end."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env
from tests.runtime.test_schedule import _outcome

__all__ = ["log_env"]


def _inventory(home: Home, everything: dict, ids: list[str]) -> None:
    """The inventory with ``ids`` only, each labelled ``group: g``; written
    whole at once (a reader never sees half a file)."""
    devices = [dict(d, labels={**d["labels"], "group": "g"}) for d in everything["devices"]]
    chosen = {"devices": [d for d in devices if d["id"] in ids]}
    partial = home.inventory.with_suffix(".tmp")
    partial.write_text(json.dumps(chosen))
    partial.replace(home.inventory)


def test_a_continuous_request_reaches_a_device_added_after_it_started(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(3)
    everything = json.loads(home.inventory.read_text())
    _inventory(home, everything, ["sim-0001", "sim-0002"])
    ends = (datetime.now(UTC) + timedelta(seconds=25)).replace(microsecond=0)
    spec = tmp_path / "continuous.json"
    spec.write_text(
        json.dumps(
            {
                "task": "reboot",
                "selector": {"group": "g"},
                "rollout": {
                    "continuous": {"every_s": 2},
                    "schedule": {"not_after": ends.isoformat()},
                },
            }
        )
    )
    table = _mayfly(home, log_env, "plan", "--file", str(spec)).stdout
    rows = dict(line.split(None, 1) for line in table.splitlines() if line.strip())
    assert rows["continuous"] == (
        f"looks for new devices matching its selector every 2 s until {ends.isoformat()}"
    ), table
    assert rows["devices"].startswith("2: sim-0001, sim-0002"), table
    up = home.up_with("-v", output=tmp_path / "up.log", **log_env)
    try:
        published = _mayfly(home, log_env, "publish", "--file", str(spec))
        assert published.returncode == 0, published.stdout + published.stderr
        request_id = _published_id(published)
        deadline = time.monotonic() + 15
        while not all(
            server.simulator.records(d)["last_request_at"] for d in ("sim-0001", "sim-0002")
        ):
            assert time.monotonic() < deadline, "the first devices were never reached"
            time.sleep(0.2)
        assert server.simulator.records("sim-0003")["last_request_at"] is None
        got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
        assert got.get("outcome") is None, got  # it goes on

        _inventory(home, everything, ["sim-0001", "sim-0002", "sim-0003"])
        added = datetime.now(UTC)
        deadline = time.monotonic() + 10
        while not server.simulator.records("sim-0003")["last_request_at"]:
            assert time.monotonic() < deadline, "the added device was never reached"
            time.sleep(0.2)
        outcome = _outcome(home, log_env, request_id, within_s=60)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    devices = {d["device_id"]: d for d in outcome["devices"]}
    assert sorted(devices) == ["sim-0001", "sim-0002", "sim-0003"], devices
    assert all(d["status"] == "succeeded" for d in devices.values()), devices
    assert datetime.fromisoformat(devices["sim-0003"]["started_at"]) >= added
    # Once each: the devices of the first look were not run again in the later ones.
    for device in devices:
        assert len(server.simulator.records(device)["log"]) == 1, device
    # It ended at its last look before its end: the next would have been past it.
    assert datetime.now(UTC) >= ends - timedelta(seconds=2)
