"""Serving coordinators: queued requests of one task type in one coordinator
process, results appended by the runtime, and the strict mode beside them."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest

from mayfly.app.local import Runtime
from mayfly.devices.sim import SimulatorServer
from mayfly.errors import EventLogError
from mayfly.eventlog import EventLog, Headers
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, TaskRequest, new_request
from mayfly.topics import Topics

from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]


def _publish(home: Home, requests: list[TaskRequest]) -> None:
    log = home.log()
    for request in requests:
        publish_request(log, request)
    log.close()


def _serve(runtime: Runtime, count: int) -> list[dict[str, object]]:
    """Run until ``count`` requests finished; every "started" the dispatcher told."""
    started: list[dict[str, object]] = []
    finished = threading.Event()
    done: Counter[str] = Counter()

    def on_dispatch(kind: str, info: dict[str, object]) -> None:
        if kind == "started":
            started.append(info)
        if kind in ("finished", "dead_lettered"):
            done["n"] += 1
            if done["n"] >= count:
                finished.set()

    runtime._on_dispatch = on_dispatch
    runtime.start()
    try:
        runtime.run(should_stop=finished.is_set)
    finally:
        runtime.close()
    return started


def _reboots(count: int) -> list[TaskRequest]:
    return [
        new_request("reboot", devices=[f"sim-{i % 4 + 1:04d}"], partition_key=f"k{i}")
        for i in range(count)
    ]


@pytest.mark.parametrize(("mode", "fewer"), [("serve", True), ("strict", False)])
def test_queued_requests_of_one_task_type_share_coordinators_unless_strict(
    home: Home, fleet: FleetFactory, mode: str, fewer: bool
) -> None:
    fleet(4)
    requests = _reboots(12)
    _publish(home, requests)
    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS="2", MAYFLY_COORDINATOR_MODE=mode))
    started = _serve(runtime, len(requests))

    coordinators = {info["coordinator"] for info in started}
    if fewer:
        assert len(coordinators) <= 4, coordinators  # 12 requests, 2 at a time
    else:
        assert len(coordinators) == len(requests)
    results = home.results()
    assert set(results) == {r.id for r in requests}
    assert all(
        isinstance(r, TaskCompleted) and r.status == "succeeded" for r in results.values()
    ), results


def test_a_serving_coordinator_gives_its_slot_to_a_higher_request_of_another_type(
    home: Home, fleet: FleetFactory
) -> None:
    fleet(1)
    lows = [
        new_request("reboot", devices=["sim-0001"], priority="low", partition_key=f"k{i}")
        for i in range(30)
    ]
    high = new_request(
        "config-push",
        devices=["sim-0001"],
        priority="high",
        params={"config": {"log_level": "info"}},
        partition_key="kh",
    )
    _publish(home, [*lows, high])
    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS="1"))
    started = _serve(runtime, 5)

    order = [info["request_id"] for info in started]
    assert high.id in order[:2], order  # never behind the low backlog its coordinator serves


class _RefusesFirstResults:
    """The runtime's log, refusing the first ``refusals`` appends to the results
    topic (a broker that says no for a moment)."""

    def __init__(self, log: EventLog, refusals: int) -> None:
        self._log = log
        self.refusals = refusals
        self._results = Topics().results

    def append_many(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        if any(topic == self._results for topic, *_ in records) and self.refusals > 0:
            self.refusals -= 1
            raise EventLogError("not now")
        self._log.append_many(records)

    def __getattr__(self, name: str) -> object:
        return getattr(self._log, name)


def test_a_result_the_runtime_could_not_append_is_run_again_not_lost(
    home: Home, fleet: FleetFactory
) -> None:
    sim = fleet(1).simulator
    request = new_request("reboot", devices=["sim-0001"])
    _publish(home, [request])
    runtime = Runtime(home.settings())
    runtime.log = _RefusesFirstResults(runtime.log, refusals=1)  # type: ignore[assignment]
    started = _serve(runtime, 1)

    assert [info["request_id"] for info in started] == [request.id, request.id]
    results = home.results()
    assert list(results) == [request.id]
    assert results[request.id].status == "succeeded"  # type: ignore[union-attr]
    # Run twice, applied once: the device dedupes the repeated action by its key.
    assert sim.duplicates() == []
    assert len(sim.log()["sim-0001"]) == 1
