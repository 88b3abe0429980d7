"""Canceling a running request: cooperative first, then hard at the end of the grace.

The runtime's end of the coordinator's channel is played by the test, over a
real pipe, with the messages the dispatcher sends (``("cancel", where,
grace_s)``); the coordinator hears them through the same
:class:`~mayfly.runtime.session.RequestControl` it uses under ``mayfly up``.
"""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe
from pathlib import Path

from mayfly.events import DeviceStatus, OverallStatus, TaskCompleted, new_request
from mayfly.runtime.session import RequestControl, RuntimeLink

from .conftest import Env, FleetFactory, write_package

STUBBORN = """
import time

def run(ctx):
    while True:                      # never looks at ctx.cancelled()
        try:
            ctx.device.state()
        except Exception:            # nor at a call the cancel gave up on
            pass
        time.sleep(0.05)
"""

BRIEF = """
import time

def run(ctx):
    time.sleep(0.6)
    return "done"
"""

WHERE = ("mayfly.requests.normal", 0, 7)


def _package(env: Env, tmp_path: Path, name: str, code: str, parallel: int) -> None:
    manifest = {
        "name": name,
        "version": "1.0.0",
        "entrypoint": "task:run",
        "limits": {"timeout_s": 60, "device_timeout_s": 30, "max_parallel": parallel},
    }
    env.publish(write_package(tmp_path / name, manifest, code))


def _cancel_later(
    delay_s: float, grace_s: float, where: tuple[str, int, int]
) -> tuple[RuntimeLink, list[float]]:
    """A coordinator's link whose runtime sends a cancel of ``where`` after
    ``delay_s``; the wall-clock time it was sent is appended to the list."""
    ours, theirs = Pipe()
    sent: list[float] = []

    def runtime() -> None:
        time.sleep(delay_s)
        sent.append(time.time())
        theirs.send(("cancel", where, grace_s))

    threading.Thread(target=runtime, daemon=True).start()
    return RuntimeLink(ours), sent


def test_a_cancel_skips_queued_devices_and_kills_running_ones_after_the_grace(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    server = fleet(8)
    _package(env, tmp_path, "stubborn", STUBBORN, parallel=2)
    link, sent = _cancel_later(1.0, 1.0, WHERE)
    coordinator = env.coordinator()
    coordinator.control = RequestControl(link, WHERE)
    ids = [f"sim-{i:04d}" for i in range(1, 9)]
    outcome = coordinator.handle(new_request("stubborn", devices=ids))
    ended = time.time()

    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.status is OverallStatus.CANCELED
    by_status: dict[DeviceStatus, list[str]] = {}
    for device in outcome.devices:
        by_status.setdefault(device.status, []).append(device.device_id)
    assert len(by_status[DeviceStatus.CANCELED]) == 2, by_status
    assert len(by_status[DeviceStatus.SKIPPED]) == 6, by_status
    results = {d.device_id: d for d in outcome.devices}
    for device_id in by_status[DeviceStatus.CANCELED]:
        assert "end of the 1 s grace period" in (results[device_id].error or "")
    for device_id in by_status[DeviceStatus.SKIPPED]:
        assert results[device_id].error == "request canceled before it started"
        assert server.simulator.records(device_id)["last_request_at"] is None  # never reached
    # Killed at the end of the grace: no device is reached after it.
    touched = [
        server.simulator.records(d)["last_request_at"] for d in by_status[DeviceStatus.CANCELED]
    ]
    assert all(t is not None for t in touched)
    assert max(touched) <= sent[0] + 1.0 + 0.2, max(touched) - sent[0]
    time.sleep(0.5)
    again = [
        server.simulator.records(d)["last_request_at"] for d in by_status[DeviceStatus.CANCELED]
    ]
    assert again == touched
    assert ended - sent[0] < 1.0 + 2.0


def test_a_package_waiting_on_its_device_stops_at_the_cancel_not_the_grace(
    env: Env, fleet: FleetFactory
) -> None:
    fleet(3, reboot_time=30.0)
    link, sent = _cancel_later(1.0, 20.0, WHERE)
    coordinator = env.coordinator()
    coordinator.control = RequestControl(link, WHERE)
    outcome = coordinator.handle(
        new_request("reboot", devices=["sim-0001", "sim-0002", "sim-0003"])
    )
    ended = time.time()

    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.status is OverallStatus.CANCELED
    assert {d.status for d in outcome.devices} == {DeviceStatus.CANCELED}
    for device in outcome.devices:
        assert device.attempts == 1  # canceled: not retried
        assert "the request was canceled" in (device.error or ""), device.error
    assert ended - sent[0] < 5.0  # the 20 s grace was not needed


def test_devices_done_within_the_grace_keep_their_success(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(2)
    _package(env, tmp_path, "brief", BRIEF, parallel=2)
    link, _ = _cancel_later(0.2, 5.0, WHERE)
    coordinator = env.coordinator()
    coordinator.control = RequestControl(link, WHERE)
    outcome = coordinator.handle(new_request("brief", devices=["sim-0001", "sim-0002"]))
    assert isinstance(outcome, TaskCompleted), outcome
    assert [d.status for d in outcome.devices] == [DeviceStatus.SUCCEEDED] * 2
    assert outcome.status is OverallStatus.SUCCEEDED


def test_a_cancel_of_another_request_changes_nothing(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(2)
    _package(env, tmp_path, "brief", BRIEF, parallel=1)
    link, sent = _cancel_later(0.2, 0.0, ("mayfly.requests.normal", 0, 8))
    coordinator = env.coordinator()
    coordinator.control = RequestControl(link, WHERE)
    outcome = coordinator.handle(new_request("brief", devices=["sim-0001", "sim-0002"]))
    assert sent  # it came, for the record after this one
    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.status is OverallStatus.SUCCEEDED
