"""The DeviceDriver contract, run against every implementation of the port.

- ``http``: :class:`HttpDriver` against a real :class:`SimulatorServer` on 127.0.0.1;
- ``http-loop``: the same driver's calls made by its non-blocking engine
  (:class:`HttpCallLoop`, what the coordinator uses), waited for here;
- ``embedded``: :class:`SimulatorDriver`, the same fleet called in-process.

Both drivers are built the way the coordinator builds them, from a zero-argument
factory, and both see one fleet whose clock the test steps by hand. The driver's
waits between attempts advance that clock instead of sleeping, so waiting out a
reboot costs no time and the waits a driver chose are recorded.

Expected values are literals, not one driver's output fed to the other: each
test fails on its own when its implementation breaks the contract.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mayfly.devices import Device, DeviceDriver, Inventory
from mayfly.devices.http import HttpDriver
from mayfly.devices.sim import Simulator, SimulatorDriver, SimulatorServer
from mayfly.errors import DeviceActionError, DeviceUnavailableError
from tests.devices.loopdriven import LoopDriven

INITIAL_CONFIG = {"ntp_server": "pool.ntp.org", "log_level": "info", "telemetry_interval_s": 60}
# Not a URL anything listens on: the embedded driver never looks at addresses.
EMBEDDED_BASE = "sim://embedded"


class FakeClock:
    """The fleet's monotonic clock, stepped by the test (and by the drivers' waits)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ClockSleep:
    """A driver's ``sleep``: records each wait and moves the fleet's clock by it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)


@dataclass
class Rig:
    """One driver and the fleet it talks to."""

    kind: str
    sim: Simulator
    driver: DeviceDriver
    inventory: Inventory
    base: str
    clock: FakeClock
    sleep: ClockSleep

    def device(self, device_id: str = "sim-0001") -> Device:
        device = self.inventory.get(device_id)
        assert device is not None
        return device

    def stranger(self, device_id: str = "sim-9999") -> Device:
        """A device the fleet does not have, addressed like its own."""
        return Device(id=device_id, address=f"{self.base}/devices/{device_id}")

    def log(self, device_id: str = "sim-0001") -> list[tuple[str, str, Any]]:
        """What the device really applied: (action, key, payload) in order."""
        entries = self.sim.records(device_id)["log"]
        return [(e["action"], e["key"], e["payload"]) for e in entries]


MakeRig = Callable[..., Rig]


@pytest.fixture(params=["http", "http-loop", "embedded"])
def make_rig(request: pytest.FixtureRequest) -> Iterator[MakeRig]:
    """Builds a fleet (``Simulator`` options) and a driver over it (``driver`` options)."""
    kind: str = request.param
    servers: list[SimulatorServer] = []
    drivers: list[DeviceDriver] = []

    def make(count: int = 3, *, driver: dict[str, Any] | None = None, **sim_options: Any) -> Rig:
        clock = FakeClock()
        sleep = ClockSleep(clock)
        sim = Simulator(count, clock=clock, **sim_options)
        options = {"sleep": sleep, **(driver or {})}
        factory: Callable[[], DeviceDriver]
        if kind in ("http", "http-loop"):
            server = SimulatorServer(sim).start()
            servers.append(server)
            base = server.url
            factory = functools.partial(HttpDriver, **options)
            if kind == "http-loop":
                factory = functools.partial(_loop_driven, factory)
        else:
            base = EMBEDDED_BASE
            factory = SimulatorDriver.factory(sim, **options)
        drivers.append(factory())
        return Rig(kind, sim, drivers[-1], sim.inventory(base), base, clock, sleep)

    yield make
    for made in drivers:
        made.close()
    for server in servers:
        server.stop()


def _loop_driven(factory: Callable[[], HttpDriver]) -> DeviceDriver:
    return LoopDriven(factory())


@pytest.fixture
def rig(make_rig: MakeRig) -> Rig:
    return make_rig()


def _backoff_ok(calls: list[float], count: int) -> bool:
    """``count`` waits of 0.1 s doubling, each with at most 10 % jitter."""
    expected = [0.1 * 2**n for n in range(count)]
    if len(calls) != count:
        return False
    return all(e <= c <= e * 1.1 for c, e in zip(calls, expected, strict=True))


# -- reading state -----------------------------------------------------------


def test_state_reads_the_device(rig: Rig) -> None:
    rig.clock.advance(12.5)

    state = rig.driver.state(rig.device("sim-0002"))

    assert state == {
        "id": "sim-0002",
        "status": "online",
        "firmware": {"version": "1.0.0", "staged": None, "download_progress": 0, "pending": None},
        "config": INITIAL_CONFIG,
        "boot_count": 1,
        "uptime_s": 12.5,
        "labels": {"site": "lab-b", "model": "m2", "ring": "main"},
    }
    assert state["labels"] == rig.device("sim-0002").labels
    assert rig.sleep.calls == []


def test_state_is_the_callers_own_copy(rig: Rig) -> None:
    device = rig.device()
    state = rig.driver.state(device)

    state["config"]["log_level"] = "trace"
    state["labels"]["site"] = "elsewhere"
    state["firmware"]["version"] = "9.9.9"

    again = rig.driver.state(device)
    assert again["config"] == INITIAL_CONFIG
    assert again["labels"]["site"] == "lab-a"
    assert again["firmware"]["version"] == "1.0.0"


# -- actions that succeed ----------------------------------------------------


def test_config_push_is_applied_and_seen_in_state(rig: Rig) -> None:
    device = rig.device()

    answer = rig.driver.action(device, "config-push", {"config": {"log_level": "debug"}}, "k1")

    assert answer == {"action": "config-push", "config": {**INITIAL_CONFIG, "log_level": "debug"}}
    assert rig.driver.state(device)["config"]["log_level"] == "debug"
    assert rig.log() == [("config-push", "k1", {"config": {"log_level": "debug"}})]


def test_firmware_update_waits_out_the_reboot_and_runs_the_new_version(make_rig: MakeRig) -> None:
    rig = make_rig(download_time=10.0, reboot_time=0.5)
    device, driver = rig.device(), rig.driver

    download = driver.action(device, "firmware-download", {"version": "2.0.0"}, "d")
    assert download == {
        "action": "firmware-download",
        "accepted": True,
        "version": "2.0.0",
        "download_progress": 0,
    }
    rig.clock.advance(10.0)
    assert driver.state(device)["firmware"]["staged"] == "2.0.0"
    install = driver.action(device, "firmware-install", {"version": "2.0.0"}, "i")
    assert install == {"action": "firmware-install", "accepted": True, "pending": "2.0.0"}
    reboot = driver.action(device, "reboot", {}, "r")
    assert reboot == {"action": "reboot", "accepted": True, "boot_count": 1}

    # Rebooting: 503 with Retry-After: 1, honoured, then the device is back.
    state = driver.state(device)

    assert rig.sleep.calls == [1.0]
    assert state["status"] == "online"
    assert state["boot_count"] == 2
    assert state["firmware"] == {
        "version": "2.0.0",
        "staged": None,
        "download_progress": 0,
        "pending": None,
    }
    assert [action for action, _, _ in rig.log()] == [
        "firmware-download",
        "firmware-install",
        "reboot",
    ]


# -- idempotency keys --------------------------------------------------------


def test_the_same_key_twice_is_applied_once_and_answers_the_same(rig: Rig) -> None:
    device = rig.device()

    first = rig.driver.action(device, "config-push", {"config": {"log_level": "debug"}}, "same")
    # Other content under the same key: still the first request, replayed.
    second = rig.driver.action(device, "config-push", {"config": {"log_level": "error"}}, "same")

    assert first == {"action": "config-push", "config": {**INITIAL_CONFIG, "log_level": "debug"}}
    assert second == first
    assert rig.driver.state(device)["config"]["log_level"] == "debug"
    assert rig.log() == [("config-push", "same", {"config": {"log_level": "debug"}})]
    assert rig.sim.records("sim-0001")["arrivals"] == {"same": 2}
    assert rig.sim.summary()["replayed"] == 1


def test_a_replayed_reboot_does_not_reboot_again(make_rig: MakeRig) -> None:
    rig = make_rig(reboot_time=1.0)
    device = rig.device()
    first = rig.driver.action(device, "reboot", {}, "r")
    rig.clock.advance(1.0)

    second = rig.driver.action(device, "reboot", {}, "r")

    assert second == first == {"action": "reboot", "accepted": True, "boot_count": 1}
    assert rig.driver.state(device)["boot_count"] == 2
    assert rig.log() == [("reboot", "r", {})]


def test_different_keys_are_applied_each_time(make_rig: MakeRig) -> None:
    rig = make_rig(reboot_time=1.0)
    device = rig.device()

    first = rig.driver.action(device, "reboot", {}, "r1")
    rig.clock.advance(1.0)
    second = rig.driver.action(device, "reboot", {}, "r2")
    rig.clock.advance(1.0)

    assert (first["boot_count"], second["boot_count"]) == (1, 2)
    assert rig.driver.state(device)["boot_count"] == 3
    assert rig.log() == [("reboot", "r1", {}), ("reboot", "r2", {})]
    assert rig.sim.summary()["replayed"] == 0


def test_a_refused_key_is_judged_afresh_when_sent_again(make_rig: MakeRig) -> None:
    rig = make_rig(download_time=1.0)
    device = rig.device()
    with pytest.raises(DeviceActionError, match=r"409 Conflict: version 2\.0\.0 not staged$"):
        rig.driver.action(device, "firmware-install", {"version": "2.0.0"}, "i")
    rig.driver.action(device, "firmware-download", {"version": "2.0.0"}, "d")
    rig.clock.advance(1.0)

    answer = rig.driver.action(device, "firmware-install", {"version": "2.0.0"}, "i")

    assert answer == {"action": "firmware-install", "accepted": True, "pending": "2.0.0"}
    assert [key for _, key, _ in rig.log()] == ["d", "i"]


# -- refusals ----------------------------------------------------------------


def test_an_unknown_action_is_refused_once_without_retrying(rig: Rig) -> None:
    with pytest.raises(DeviceActionError) as caught:
        rig.driver.action(rig.device(), "self-destruct", {}, "k")

    assert type(caught.value) is DeviceActionError
    assert caught.value.device_id == "sim-0001"
    assert str(caught.value) == (
        "device sim-0001: POST /actions/self-destruct: 404 Not Found: unknown action "
        "'self-destruct'; known: reboot, firmware-download, firmware-install, config-push"
    )
    assert rig.sleep.calls == []
    assert rig.sim.summary()["requests"] == 1
    assert rig.log() == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "POST /actions/: 404 Not Found"),
        ("../state", "POST /actions/..%2Fstate: 404 Not Found: unknown action '../state'"),
        ("reboot/x", "POST /actions/reboot%2Fx: 404 Not Found: unknown action 'reboot/x'"),
    ],
)
def test_an_action_name_cannot_reach_another_endpoint(rig: Rig, name: str, expected: str) -> None:
    with pytest.raises(DeviceActionError) as caught:
        rig.driver.action(rig.device(), name, {}, "k")

    message = str(caught.value)
    assert message.split("; known:")[0] == f"device sim-0001: {expected}"
    assert rig.log() == []
    assert rig.driver.state(rig.device())["boot_count"] == 1


def test_an_unknown_device_is_refused(rig: Rig) -> None:
    stranger = rig.stranger()

    with pytest.raises(DeviceActionError) as state:
        rig.driver.state(stranger)
    with pytest.raises(DeviceActionError) as action:
        rig.driver.action(stranger, "reboot", {}, "k")

    assert str(state.value) == "device sim-9999: GET /state: 404 Not Found: unknown device sim-9999"
    assert str(action.value) == (
        "device sim-9999: POST /actions/reboot: 404 Not Found: unknown device sim-9999"
    )
    assert rig.sim.summary()["requests"] == 2


def test_a_bad_payload_is_refused_and_not_applied(rig: Rig) -> None:
    device = rig.device()

    with pytest.raises(DeviceActionError) as caught:
        rig.driver.action(device, "firmware-download", {"version": "2.0"}, "k")

    assert str(caught.value) == (
        "device sim-0001: POST /actions/firmware-download: 422 Unprocessable Entity: "
        "version must be a string like 1.2.3, got '2.0'"
    )
    assert rig.driver.state(device)["firmware"]["download_progress"] == 0
    assert rig.log() == []
    assert rig.sleep.calls == []


def test_an_action_without_a_key_is_refused(rig: Rig) -> None:
    with pytest.raises(DeviceActionError) as caught:
        rig.driver.action(rig.device(), "reboot", {}, "")

    assert str(caught.value) == (
        "device sim-0001: POST /actions/reboot: 400 Bad Request: missing Idempotency-Key header"
    )
    assert rig.driver.state(rig.device())["boot_count"] == 1


def test_a_payload_that_is_not_json_is_refused_before_sending(rig: Rig) -> None:
    with pytest.raises(DeviceActionError) as caught:
        rig.driver.action(rig.device(), "config-push", {"config": {"x": float("nan")}}, "k")

    assert str(caught.value) == (
        "device sim-0001: POST /actions/config-push: payload is not JSON: "
        "Out of range float values are not JSON compliant"
    )
    assert rig.sim.summary()["requests"] == 0


def test_a_key_that_is_no_header_value_fails_before_sending(rig: Rig) -> None:
    with pytest.raises(DeviceUnavailableError) as caught:
        rig.driver.action(rig.device(), "reboot", {}, "two\nlines")

    # The words are the HTTP library's own (HttpDriver passes them on), so only their gist.
    message = str(caught.value)
    assert message.startswith("device sim-0001: POST /actions/reboot: "), message
    assert "header value" in message, message
    assert "two\\nlines" in message, message
    assert rig.sim.summary()["requests"] == 0


def test_payloads_and_answers_travel_as_json(rig: Rig) -> None:
    config = {"servers": ("a", "b"), "ports": {1: "x"}}

    answer = rig.driver.action(rig.device(), "config-push", {"config": config}, "k")

    sent = {"servers": ["a", "b"], "ports": {"1": "x"}}
    assert answer["config"] == {**INITIAL_CONFIG, **sent}
    assert rig.log() == [("config-push", "k", {"config": sent})]


# -- failures ----------------------------------------------------------------


def test_a_broken_device_fails_actions_as_unavailable_but_answers_state(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(broken=["sim-0002"])
    broken = rig.device("sim-0002")

    with pytest.raises(DeviceUnavailableError) as caught:
        rig.driver.action(broken, "reboot", {}, "k")

    assert type(caught.value) is DeviceUnavailableError
    assert str(caught.value) == (
        "device sim-0002: POST /actions/reboot: 500 (device fault) after 4 attempts"
    )
    assert _backoff_ok(rig.sleep.calls, 3), rig.sleep.calls
    records = rig.sim.records("sim-0002")
    assert (records["arrivals"], records["rejected"], records["log"]) == ({"k": 4}, {"k": 4}, [])
    assert rig.driver.state(broken)["status"] == "online"
    assert rig.driver.state(broken)["boot_count"] == 1
    healthy = rig.driver.action(rig.device("sim-0001"), "reboot", {}, "k")
    assert healthy == {"action": "reboot", "accepted": True, "boot_count": 1}


def test_injected_failures_are_retried_with_the_same_key_and_applied_once(
    make_rig: MakeRig,
) -> None:
    # Seed 7 draws 0.32, 0.15, 0.65...: two injected 503s, then through.
    rig = make_rig(failure_rate=0.5, seed=7)

    answer = rig.driver.action(rig.device(), "config-push", {"config": {"x": 1}}, "k")

    assert answer == {"action": "config-push", "config": {**INITIAL_CONFIG, "x": 1}}
    records = rig.sim.records("sim-0001")
    assert (records["arrivals"], records["rejected"]) == ({"k": 3}, {"k": 2})
    assert rig.log() == [("config-push", "k", {"config": {"x": 1}})]
    assert _backoff_ok(rig.sleep.calls, 2), rig.sleep.calls


def test_constant_failure_exhausts_the_retries(make_rig: MakeRig) -> None:
    rig = make_rig(failure_rate=1.0)
    device = rig.device()

    with pytest.raises(DeviceUnavailableError) as state:
        rig.driver.state(device)
    with pytest.raises(DeviceUnavailableError) as action:
        rig.driver.action(device, "reboot", {}, "k")

    assert str(state.value) == (
        "device sim-0001: GET /state: 503 (injected failure) after 4 attempts"
    )
    assert str(action.value) == (
        "device sim-0001: POST /actions/reboot: 503 (injected failure) after 4 attempts"
    )
    summary = rig.sim.summary()
    assert (summary["requests"], summary["injected_failures"], summary["applied"]) == (8, 8, 0)
    assert rig.log() == []


def test_retries_are_as_configured(make_rig: MakeRig) -> None:
    rig = make_rig(failure_rate=1.0, driver={"retries": 0})

    with pytest.raises(DeviceUnavailableError, match=r"503 \(injected failure\) after 1 attempts$"):
        rig.driver.state(rig.device())

    assert rig.sleep.calls == []
    assert rig.sim.summary()["requests"] == 1


# -- deadlines and timeouts --------------------------------------------------


def test_a_passed_deadline_sends_nothing(rig: Rig) -> None:
    past = time.monotonic() - 1

    with pytest.raises(DeviceUnavailableError) as state:
        rig.driver.state(rig.device(), deadline=past)
    with pytest.raises(DeviceUnavailableError) as action:
        rig.driver.action(rig.device(), "reboot", {}, "k", deadline=past)

    assert str(state.value) == "device sim-0001: deadline passed before GET /state"
    assert str(action.value) == "device sim-0001: deadline passed before POST /actions/reboot"
    assert rig.sim.summary()["requests"] == 0


def test_a_deadline_stops_waiting_for_a_rebooting_device(make_rig: MakeRig) -> None:
    rig = make_rig(reboot_time=5.0)
    rig.driver.action(rig.device(), "reboot", {}, "r")

    with pytest.raises(DeviceUnavailableError) as caught:
        rig.driver.state(rig.device(), deadline=time.monotonic() + 0.5)

    assert str(caught.value) == (
        "device sim-0001: deadline passed: GET /state: 503 (rebooting) after 1 attempt(s)"
    )
    assert rig.sleep.calls == []


def test_a_slow_state_read_times_out(make_rig: MakeRig) -> None:
    rig = make_rig(latency_ms=300, driver={"read_timeout": 0.1, "retries": 1})

    started = time.monotonic()
    with pytest.raises(DeviceUnavailableError) as caught:
        rig.driver.state(rig.device())

    assert str(caught.value) == "device sim-0001: GET /state: read timeout after 2 attempts"
    # Each attempt gave up after the read timeout, not after the device's 300 ms.
    assert time.monotonic() - started < 0.6
    assert _backoff_ok(rig.sleep.calls, 1), rig.sleep.calls


def test_a_timed_out_action_is_not_applied_and_its_retry_is_applied_once(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(latency_ms=300, driver={"read_timeout": 0.1, "retries": 0})
    device = rig.device()

    with pytest.raises(DeviceUnavailableError) as caught:
        rig.driver.action(device, "config-push", {"config": {"x": 1}}, "k")

    assert str(caught.value) == (
        "device sim-0001: POST /actions/config-push: read timeout after 1 attempts"
    )
    time.sleep(0.4)  # past the device's latency: a late arrival would have landed
    assert rig.log() == []
    rig.sim.latency_ms = 0
    again = rig.driver.action(device, "config-push", {"config": {"x": 1}}, "k")
    assert again == {"action": "config-push", "config": {**INITIAL_CONFIG, "x": 1}}
    assert rig.log() == [("config-push", "k", {"config": {"x": 1}})]
    assert rig.sim.records("sim-0001")["arrivals"] == {"k": 1}
    assert rig.sim.summary()["replayed"] == 0
