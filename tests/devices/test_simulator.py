"""The device simulator as its clients see it: over HTTP, through its records and its CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from mayfly.cli import cli
from mayfly.devices.sim import Simulator, SimulatorServer, device_ids


class FakeClock:
    """A monotonic clock the test steps by hand, so timed transitions need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Fleet:
    sim: Simulator
    server: SimulatorServer
    http: requests.Session

    def state(self, device: str = "sim-0001") -> requests.Response:
        return self.http.get(f"{self.server.url}/devices/{device}/state", timeout=5)

    def act(
        self,
        name: str,
        payload: dict[str, Any] | None = None,
        *,
        key: str | None = "k1",
        device: str = "sim-0001",
    ) -> requests.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        url = f"{self.server.url}/devices/{device}/actions/{name}"
        return self.http.post(url, json=payload or {}, headers=headers, timeout=5)

    def admin(self, path: str) -> Any:
        response = self.http.get(f"{self.server.url}/_sim/{path}", timeout=5)
        assert response.status_code == 200, response.text
        return response.json()


Serve = Callable[..., Fleet]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Starts simulators on free ports; stops them and closes their sessions afterwards."""
    fleets: list[Fleet] = []

    def start(count: int = 3, **options: Any) -> Fleet:
        sim = Simulator(count, **options)
        fleet = Fleet(sim, SimulatorServer(sim).start(), requests.Session())
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        fleet.http.close()
        fleet.server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_state_has_the_protocol_shape(serve: Serve) -> None:
    response = serve().state("sim-0002")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    state = response.json()
    assert set(state) == {"id", "status", "firmware", "config", "boot_count", "uptime_s", "labels"}
    assert state["id"] == "sim-0002"
    assert state["status"] == "online"
    assert state["firmware"] == {
        "version": "1.0.0",
        "staged": None,
        "download_progress": 0,
        "pending": None,
    }
    assert isinstance(state["config"], dict)
    assert state["boot_count"] == 1
    assert isinstance(state["uptime_s"], float)
    assert state["labels"] == {"site": "lab-b", "model": "m2", "ring": "main"}


def test_reboot_makes_the_device_unavailable_then_back_by_itself(serve: Serve) -> None:
    fleet = serve(reboot_time=0.1)
    before = fleet.state().json()

    accepted = fleet.act("reboot")
    assert accepted.status_code == 200
    assert accepted.json() == {"action": "reboot", "accepted": True, "boot_count": 1}
    down = fleet.state()
    assert down.status_code == 503
    assert down.json() == {"error": "rebooting"}
    assert down.headers["Retry-After"] == "1"
    assert fleet.act("config-push", {"config": {"a": 1}}, key="k2").status_code == 503

    deadline = time.monotonic() + 5
    while (after := fleet.state()).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert after.status_code == 200
    assert after.json()["boot_count"] == before["boot_count"] + 1


def test_reboot_resets_uptime_when_reboot_time_has_passed(serve: Serve, clock: FakeClock) -> None:
    fleet = serve(reboot_time=5.0, clock=clock)
    clock.advance(60)
    assert fleet.state().json()["uptime_s"] == 60.0

    fleet.act("reboot")
    clock.advance(4.9)
    assert fleet.state().status_code == 503
    clock.advance(0.6)

    state = fleet.state().json()
    assert state["boot_count"] == 2
    assert state["uptime_s"] == pytest.approx(0.5)


def test_firmware_downloads_stages_installs_and_activates_on_reboot(
    serve: Serve, clock: FakeClock
) -> None:
    fleet = serve(download_time=10.0, reboot_time=1.0, clock=clock)

    started = fleet.act("firmware-download", {"version": "2.0.0"}, key="d")
    assert started.status_code == 202
    assert started.json()["download_progress"] == 0
    clock.advance(2.5)
    midway = fleet.state().json()["firmware"]
    assert midway == {"version": "1.0.0", "staged": None, "download_progress": 25, "pending": None}

    refused = fleet.act("firmware-install", {"version": "2.0.0"}, key="i1")
    assert refused.status_code == 409
    assert refused.json() == {"error": "version 2.0.0 not staged"}

    clock.advance(7.5)
    assert fleet.state().json()["firmware"]["staged"] == "2.0.0"
    assert fleet.state().json()["firmware"]["download_progress"] == 100
    installed = fleet.act("firmware-install", {"version": "2.0.0"}, key="i2")
    assert installed.status_code == 200
    firmware = fleet.state().json()["firmware"]
    assert (firmware["version"], firmware["pending"]) == ("1.0.0", "2.0.0")

    fleet.act("reboot", key="r")
    clock.advance(1.0)
    state = fleet.state().json()
    assert state["boot_count"] == 2
    assert state["firmware"] == {
        "version": "2.0.0",
        "staged": None,
        "download_progress": 0,
        "pending": None,
    }
    assert fleet.admin("summary")["firmware"] == {"1.0.0": 2, "2.0.0": 1}


@pytest.mark.parametrize("payload", [{}, {"version": "2.0"}, {"version": 2}])
def test_a_bad_firmware_version_is_refused_and_not_applied(
    serve: Serve, payload: dict[str, Any]
) -> None:
    fleet = serve()

    response = fleet.act("firmware-download", payload)

    assert response.status_code == 422
    assert "version" in response.json()["error"]
    assert fleet.sim.records("sim-0001")["log"] == []


def test_the_same_key_twice_is_applied_once_and_replayed(serve: Serve) -> None:
    fleet = serve()

    first = fleet.act("config-push", {"config": {"log_level": "debug"}}, key="same")
    # Different content under the same key: still a replay, nothing applied.
    second = fleet.act("config-push", {"config": {"log_level": "error"}}, key="same")

    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert (second.status_code, second.json()) == (first.status_code, first.json())
    assert fleet.state().json()["config"]["log_level"] == "debug"
    records = fleet.admin("devices/sim-0001")
    assert [entry["key"] for entry in records["log"]] == ["same"]
    assert records["arrivals"] == {"same": 2}
    assert fleet.admin("summary")["replayed"] == 1


def test_a_replayed_reboot_does_not_reboot_again(serve: Serve, clock: FakeClock) -> None:
    fleet = serve(reboot_time=1.0, clock=clock)
    fleet.act("reboot", key="r")
    clock.advance(1.0)

    replay = fleet.act("reboot", key="r")

    assert replay.json()["boot_count"] == 1
    assert fleet.state().json()["boot_count"] == 2


def test_config_push_merges_or_replaces(serve: Serve) -> None:
    fleet = serve()
    initial = fleet.state().json()["config"]

    merged = fleet.act("config-push", {"config": {"log_level": "debug"}}, key="m")
    assert merged.json()["config"] == {**initial, "log_level": "debug"}

    replaced = fleet.act("config-push", {"config": {"x": 1}, "mode": "replace"}, key="r")
    assert replaced.json()["config"] == {"x": 1}
    assert fleet.state().json()["config"] == {"x": 1}

    bad = fleet.act("config-push", {"config": {"x": 2}, "mode": "patch"}, key="b")
    assert bad.status_code == 422
    assert fleet.state().json()["config"] == {"x": 1}


def test_failure_rate_one_rejects_everything_and_applies_nothing(serve: Serve) -> None:
    fleet = serve(failure_rate=1.0)

    state = fleet.state()
    action = fleet.act("reboot", key="k")

    assert (state.status_code, state.json()) == (503, {"error": "injected failure"})
    assert (action.status_code, action.json()) == (503, {"error": "injected failure"})
    records = fleet.sim.records("sim-0001")
    assert records["log"] == []
    assert records["arrivals"] == {"k": 1}
    assert records["rejected"] == {"k": 1}
    assert records["state"]["boot_count"] == 1
    summary = fleet.admin("summary")
    assert (summary["injected_failures"], summary["applied"]) == (2, 0)


def test_injected_failures_are_reproducible_with_a_seed(serve: Serve) -> None:
    def statuses(seed: int) -> list[int]:
        fleet = serve(failure_rate=0.5, seed=seed)
        return [fleet.state().status_code for _ in range(40)]

    first = statuses(7)

    assert first == statuses(7)
    assert {200, 503} == set(first)


def test_broken_devices_fail_actions_but_answer_state(serve: Serve) -> None:
    fleet = serve(broken=["sim-0002"])

    action = fleet.act("reboot", device="sim-0002")
    state = fleet.state("sim-0002")

    assert (action.status_code, action.json()) == (500, {"error": "device fault"})
    assert state.status_code == 200
    # A broken device's state is a healthy one's: online, first boot, its own labels.
    # Only the simulator's records say it is broken.
    body = state.json()
    assert (body["id"], body["status"], body["boot_count"]) == ("sim-0002", "online", 1)
    assert body["firmware"]["version"] == "1.0.0"
    assert body["labels"] == {"site": "lab-b", "model": "m2", "ring": "main"}
    listed = fleet.server.inventory().get("sim-0002")
    assert listed is not None
    assert body["labels"] == listed.labels
    records = fleet.sim.records("sim-0002")
    assert (records["broken"], fleet.sim.records("sim-0001")["broken"]) == (True, False)
    assert records["rejected"] == {"k1": 1}
    assert records["log"] == []
    assert fleet.act("reboot", device="sim-0001").status_code == 200
    assert fleet.admin("summary")["broken"] == ["sim-0002"]


def test_a_broken_fraction_is_chosen_by_seed() -> None:
    chosen = Simulator(20, broken=0.25, seed=1).broken_ids

    assert len(chosen) == 5
    assert Simulator(20, broken=0.25, seed=1).broken_ids == chosen
    assert Simulator(20, broken=0.25, seed=2).broken_ids != chosen
    assert len(Simulator(3, broken=0.01).broken_ids) == 1
    with pytest.raises(ValueError, match="sim-0099"):
        Simulator(3, broken=["sim-0099"])


def test_unknown_device_or_action_is_404(serve: Serve) -> None:
    fleet = serve()

    assert fleet.state("sim-9999").status_code == 404
    assert fleet.act("reboot", device="sim-9999").status_code == 404
    unknown = fleet.act("self-destruct")
    assert unknown.status_code == 404
    assert "unknown action" in unknown.json()["error"]
    records = fleet.http.get(f"{fleet.server.url}/_sim/devices/sim-9999", timeout=5)
    assert records.status_code == 404


@pytest.mark.parametrize("key", [None, ""])
def test_an_action_without_idempotency_key_is_400_and_not_applied(
    serve: Serve, key: str | None
) -> None:
    fleet = serve()

    response = fleet.act("reboot", key=key)

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert fleet.state().json()["boot_count"] == 1


def test_summary_log_duplicates_and_reset(serve: Serve) -> None:
    fleet = serve(count=4)
    for device in ("sim-0001", "sim-0003"):
        fleet.act("config-push", {"config": {"a": 1}}, key="push", device=device)
        fleet.act("config-push", {"config": {"a": 1}}, key="push", device=device)
    fleet.state()

    summary = fleet.admin("summary")
    assert summary["devices"] == 4
    assert (summary["requests"], summary["applied"], summary["replayed"]) == (5, 2, 2)
    assert summary["firmware"] == {"1.0.0": 4}
    log = fleet.admin("log")
    assert sorted(log) == ["sim-0001", "sim-0002", "sim-0003", "sim-0004"]
    assert [e["action"] for e in log["sim-0003"]] == ["config-push"]
    assert log["sim-0003"][0]["payload"] == {"config": {"a": 1}}
    assert fleet.admin("duplicates") == []
    assert fleet.sim.duplicates() == []

    reset = fleet.http.post(f"{fleet.server.url}/_sim/reset", timeout=5)
    assert reset.status_code == 200
    assert fleet.admin("summary")["requests"] == 0
    assert fleet.admin("log")["sim-0001"] == []
    assert "a" not in fleet.state().json()["config"]


def test_inventory_addresses_reach_their_devices(serve: Serve) -> None:
    fleet = serve(count=40)

    inventory = fleet.server.inventory()

    assert len(inventory) == 40
    for device in inventory:
        response = fleet.http.get(f"{device.address}/state", timeout=5)
        assert response.json()["id"] == device.id
        assert device.capabilities == ("reboot", "firmware", "config")
    labels = [d.labels for d in inventory]
    assert [lab["ring"] for lab in labels].count("canary") == 2
    assert [lab["site"] for lab in labels[:4]] == ["lab-a", "lab-b", "lab-c", "lab-a"]
    assert device_ids(12345)[0] == "sim-00001"


def test_latency_is_added_to_device_requests(serve: Serve) -> None:
    fleet = serve(latency_ms=150)

    started = time.monotonic()
    fleet.state()

    assert time.monotonic() - started >= 0.15


def test_a_busy_port_is_refused(serve: Serve) -> None:
    fleet = serve()

    with (
        pytest.raises(OSError, match=r"(?i)in use"),
        SimulatorServer(Simulator(1), port=fleet.server.port),
    ):
        pass


def test_cli_help_explains_flags_and_endpoints() -> None:
    result = CliRunner().invoke(cli, ["devices", "simulate", "--help"])

    assert result.exit_code == 0
    for text in (
        "--count",
        "--port",
        "--inventory",
        "--reboot-time",
        "--download-time",
        "--latency-ms",
        "--jitter-ms",
        "--failure-rate",
        "--broken",
        "--seed",
        "/devices/{id}/state",
        "/_sim/summary",
        "Idempotency-Key",
    ):
        assert text in result.output


@pytest.mark.parametrize(
    "flags",
    [
        ["--count", "-1"],
        ["--count", "3", "--failure-rate", "1.5"],
        ["--count", "3", "--latency-ms", "-5"],
        ["--count", "3", "--broken", "2"],
        ["--count", "3", "--broken", "sim-0099"],
        ["--count", "3", "--action", "reboot"],  # built in
        ["--count", "3", "--action", "bad name"],
        ["--count", "3", "--action", "blink={not json"],
        ["--count", "3", "--action", "blink=[1, 2]"],  # not an object
        ["--count", "3", "--capability", "../x"],
        ["--count", "3", "--action", "blink=" + "[" * 50_000 + "]" * 50_000],  # too deep
    ],
)
def test_cli_bad_flag_is_a_usage_error(flags: list[str]) -> None:
    result = CliRunner().invoke(cli, ["devices", "simulate", *flags])

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_cli_simulate_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.json"
    command = [sys.executable, "-c", "from mayfly.cli import main; main()", "devices", "simulate"]
    flags = ["--count", "3", "--port", "0", "--inventory", str(inventory)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [*command, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            deadline = time.monotonic() + 20
            devices: list[dict[str, Any]] = []
            while not devices and time.monotonic() < deadline and process.poll() is None:
                try:
                    devices = json.loads(inventory.read_text())["devices"]
                except (OSError, ValueError):
                    time.sleep(0.05)
            assert [d["id"] for d in devices] == ["sim-0001", "sim-0002", "sim-0003"]
            state = requests.get(f"{devices[2]['address']}/state", timeout=5)
            assert state.json()["id"] == "sim-0003"
        finally:
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=20)

    assert process.returncode == 0, err
    assert "serving    3 devices" in out
    assert str(inventory) in out
    assert "stopped after 1 requests" in out


def test_a_declared_action_records_its_body_and_answers_from_its_template() -> None:
    sim = Simulator(
        2,
        actions={"blink": {"blinked": "$payload", "by": "{device_id}", "what": "{action}"}},
        capabilities=["led", "led"],
    )
    device = sim.inventory("http://127.0.0.1:9").get("sim-0001")
    assert device is not None
    assert device.capabilities == (
        "reboot",
        "firmware",
        "config",
        "led",
    )
    first = sim.action("sim-0001", "blink", {"times": 3}, "k1")
    assert first.status == 200
    assert first.body == {"blinked": {"times": 3}, "by": "sim-0001", "what": "blink"}
    again = sim.action("sim-0001", "blink", {"times": 9}, "k1")  # a retry: replayed
    assert again.body == first.body
    assert [(e["action"], e["payload"]) for e in sim.records("sim-0001")["log"]] == [
        ("blink", {"times": 3})
    ]
    unknown = sim.action("sim-0001", "wink", {}, "k2")
    assert unknown.status == 404
    assert "blink" in unknown.body["error"]


def test_a_declarations_file_serves_its_actions(tmp_path: Path) -> None:
    declared = tmp_path / "sim.json"
    declared.write_text(json.dumps({"actions": {"blink": {"ok": True}}, "capabilities": ["led"]}))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"action": {}}))
    refused = CliRunner().invoke(
        cli, ["devices", "simulate", "--count", "1", "--declare", str(wrong)]
    )
    assert refused.exit_code == 2
    assert "unknown key(s) action" in refused.output
    from mayfly.cli.devices import declarations

    actions, caps = declarations(declared, ("wink",), ("eye",))
    assert actions == {"blink": {"ok": True}, "wink": {"action": "{action}", "ok": True}}
    assert caps == ["led", "eye"]


def test_a_declarations_file_nested_too_deep_is_refused_not_a_traceback(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"actions": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    flags = ["devices", "simulate", "--count", "1", "--declare", str(deep)]
    refused = CliRunner().invoke(cli, flags)
    assert refused.exit_code == 2, refused.output
    assert "nested" in refused.output
    assert "Traceback" not in refused.output
