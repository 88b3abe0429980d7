"""Serving coordinators: queued requests of one task type in one coordinator
process, results appended by the runtime, and the strict mode beside them."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mayfly.app.local import Runtime
from mayfly.app.publishing import publish_folder
from mayfly.devices.sim import SimulatorServer
from mayfly.errors import EventLogError
from mayfly.eventlog import EventLog, Headers
from mayfly.eventlog.publisher import publish_request
from mayfly.events import (
    TASK_PROGRESS,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    from_kafka,
    new_request,
)
from mayfly.runtime.state import request_identity
from mayfly.topics import Topics

from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]


def _publish(home: Home, requests: list[TaskRequest]) -> None:
    log = home.log()
    for request in requests:
        publish_request(log, request)
    log.close()


def _serve(runtime: Runtime, count: int, **options: Any) -> list[tuple[str, dict[str, object]]]:
    """Run until ``count`` requests ended (finished or dead-lettered), the
    dispatcher's ``options`` changed; everything the dispatcher told, in order."""
    told: list[tuple[str, dict[str, object]]] = []
    ended = threading.Event()
    done: Counter[str] = Counter()

    def on_dispatch(kind: str, info: dict[str, object]) -> None:
        told.append((kind, info))
        if kind in ("finished", "dead_lettered"):
            done["n"] += 1
            if done["n"] >= count:
                ended.set()

    runtime._on_dispatch = on_dispatch
    runtime.start()
    assert runtime.dispatcher is not None
    runtime.dispatcher.options = dataclasses.replace(runtime.dispatcher.options, **options)
    deadline = time.monotonic() + 60
    try:
        runtime.run(should_stop=lambda: ended.is_set() or time.monotonic() > deadline)
    finally:
        runtime.close()
    return told


def _started(told: list[tuple[str, dict[str, object]]]) -> list[dict[str, object]]:
    return [info for kind, info in told if kind == "started"]


def _kinds(told: list[tuple[str, dict[str, object]]], request_id: str) -> list[str]:
    """What was told of one request, in order."""
    return [kind for kind, info in told if info["request_id"] == request_id]


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
    started = _started(_serve(runtime, len(requests)))

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
    started = _started(_serve(runtime, 5))

    order = [info["request_id"] for info in started]
    assert high.id in order[:2], order  # never behind the low backlog its coordinator serves


class _RefusesFirstResults:
    """The runtime's log, refusing the first ``refusals`` appends of outcomes to
    the results topic (a broker that says no for a moment); progress reports,
    which a run may send first, go through."""

    def __init__(self, log: EventLog, refusals: int) -> None:
        self._log = log
        self.refusals = refusals
        self._results = Topics().results

    def _has_outcome(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> bool:
        return any(
            topic == self._results and dict(headers).get("ce_type") != TASK_PROGRESS.encode()
            for topic, _key, _value, headers in records
        )

    def append_many(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        if self._has_outcome(records) and self.refusals > 0:
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
    started = _started(_serve(runtime, 1))

    assert [info["request_id"] for info in started] == [request.id, request.id]
    results = home.results()
    assert list(results) == [request.id]
    assert results[request.id].status == "succeeded"  # type: ignore[union-attr]
    # Run twice, applied once: the device dedupes the repeated action by its key.
    assert sim.duplicates() == []
    assert len(sim.log()["sim-0001"]) == 1


def test_a_log_refusing_results_for_a_while_is_waited_for_not_counted_as_crashes(
    home: Home, fleet: FleetFactory
) -> None:
    # As many refusals as the crash budget (3): counted as crashes, the request
    # was dead-lettered as "crashed 3 times" although its device had acted.
    sim = fleet(1).simulator
    request = new_request("reboot", devices=["sim-0001"])
    _publish(home, [request])
    runtime = Runtime(home.settings())
    runtime.log = _RefusesFirstResults(runtime.log, refusals=3)  # type: ignore[assignment]
    told = _serve(runtime, 1, crash_backoff_s=0.05)

    assert "dead_lettered" not in _kinds(told, request.id)
    assert _kinds(told, request.id).count("started") == 4
    results = home.results()
    assert isinstance(results[request.id], TaskCompleted), results[request.id]
    assert len(sim.log()["sim-0001"]) == 1  # four runs, applied once
    state = runtime.state
    assert state.add_crash(request_identity(request.source, request.id)) == 1  # none before


def _package(
    home: Home, tmp_path: Path, name: str, properties: dict[str, object] | None = None
) -> None:
    """Publish a package whose request may run 1 s (``timeout_s``)."""
    folder = tmp_path / name
    folder.mkdir()
    manifest: dict[str, object] = {
        "name": name,
        "version": "1.0.0",
        "entrypoint": f"{name}:run",
        "limits": {"timeout_s": 1, "device_timeout_s": 1},
    }
    if properties:
        manifest["params_schema"] = {"type": "object", "properties": properties}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / f"{name}.py").write_text("def run(ctx):\n    return 'ok'\n")
    publish_folder(home.settings(), folder)


def test_a_coordinator_stuck_in_its_params_is_killed_and_its_request_dead_lettered(
    home: Home, fleet: FleetFactory, tmp_path: Path
) -> None:
    """A params value against a backtracking pattern (a package's own schema)
    would hold its coordinator for ever; the runtime kills it past the
    request's deadline, and serves the next request meanwhile."""
    fleet(1)
    _package(home, tmp_path, "greedy", {"name": {"type": "string", "pattern": "^(a+)+$"}})
    stuck = new_request("greedy", devices=["sim-0001"], params={"name": "a" * 40 + "!"})
    after = new_request("reboot", devices=["sim-0001"], partition_key="other")
    _publish(home, [stuck, after])

    told = _serve(Runtime(home.settings()), 2, deadline_grace_s=0.5, crash_backoff_s=0.05)

    assert _kinds(told, after.id) == ["started", "finished"], told
    assert _kinds(told, stuck.id)[-1] == "dead_lettered", told
    log = home.log()
    try:
        consumer = log.consumer("test", Topics().dead_letter)
        [record] = consumer.poll(10, 5.0)
    finally:
        log.close()
    rejection = from_kafka(record.headers, record.key, record.value)
    assert isinstance(rejection, TaskRejected)
    assert "ran past its request's deadline" in rejection.reason


class _SlowResults(_RefusesFirstResults):
    """The runtime's log, taking ``delay_s`` to append the first results."""

    def __init__(self, log: EventLog, delay_s: float) -> None:
        super().__init__(log, refusals=0)
        self.delay_s = delay_s

    def append_many(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        if any(topic == self._results for topic, *_ in records) and self.delay_s:
            time.sleep(self.delay_s)
            self.delay_s = 0.0
        super().append_many(records)


class _KillsAfterResults(_RefusesFirstResults):
    """The runtime's log, killing every coordinator once their first outcome
    is appended: dead between its result made durable and its "done"."""

    def __init__(self, log: EventLog, runtime: Runtime) -> None:
        super().__init__(log, refusals=0)
        self.runtime = runtime
        self.killed: list[int] = []

    def append_many(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        super().append_many(records)
        if self._has_outcome(records) and not self.killed:
            assert self.runtime.dispatcher is not None
            for session in list(self.runtime.dispatcher.sessions.values()):
                if session.pid is not None:
                    os.kill(session.pid, signal.SIGKILL)
                    self.killed.append(session.pid)


def test_a_coordinator_dead_after_its_outcome_was_appended_is_not_run_again(
    home: Home, fleet: FleetFactory
) -> None:
    sim = fleet(1).simulator
    request = new_request("reboot", devices=["sim-0001"])
    _publish(home, [request])
    runtime = Runtime(home.settings())
    killing = _KillsAfterResults(runtime.log, runtime)
    runtime.log = killing  # type: ignore[assignment]
    told = _serve(runtime, 1)

    assert killing.killed, "no coordinator was killed"
    assert _kinds(told, request.id) == ["started", "finished"], told
    assert list(home.results()) == [request.id]
    assert len(sim.records("sim-0001")["log"]) == 1  # run once


def test_a_coordinator_waiting_on_the_runtimes_slow_log_is_not_killed_as_hung(
    home: Home, fleet: FleetFactory, tmp_path: Path
) -> None:
    """The watchdog is for a coordinator stuck on its own: one waiting for the
    runtime to append its result, past the request's deadline, is left alone,
    and its request is not run twice."""
    fleet(1)
    _package(home, tmp_path, "quick")
    request = new_request("quick", devices=["sim-0001"])
    _publish(home, [request])
    runtime = Runtime(home.settings())
    runtime.log = _SlowResults(runtime.log, delay_s=2.5)  # type: ignore[assignment]
    told = _serve(runtime, 1, deadline_grace_s=0.5)

    assert _kinds(told, request.id) == ["started", "finished"], told
    assert list(home.results()) == [request.id]


def test_a_killed_warm_parent_is_started_again_and_its_requests_run(
    home: Home, fleet: FleetFactory
) -> None:
    sim = fleet(4).simulator
    requests = _reboots(12)
    _publish(home, requests)
    runtime = Runtime(home.settings())
    killed: list[int] = []

    def kill_once(kind: str, _info: dict[str, object]) -> None:
        if kind == "started" and not killed and runtime.spawner.pid is not None:
            killed.append(runtime.spawner.pid)
            os.kill(killed[0], signal.SIGKILL)  # mid-request, coordinators with it

    told = _serve_with(runtime, len(requests), kill_once)

    assert killed, "never started"
    assert runtime.spawner.pid is None  # closed after the run
    results = home.results()
    assert set(results) == {r.id for r in requests}
    assert all(isinstance(r, TaskCompleted) for r in results.values())
    assert [kind for kind, _ in told if kind == "dead_lettered"] == []
    assert sim.duplicates() == []


def _serve_with(
    runtime: Runtime, count: int, also: Callable[[str, dict[str, object]], None]
) -> list[tuple[str, dict[str, object]]]:
    """:func:`_serve`, telling ``also`` of every dispatch decision too."""
    told: list[tuple[str, dict[str, object]]] = []
    done: Counter[str] = Counter()

    def on_dispatch(kind: str, info: dict[str, object]) -> None:
        told.append((kind, info))
        done[kind] += 1
        also(kind, info)

    runtime._on_dispatch = on_dispatch
    runtime.start()
    deadline = time.monotonic() + 60
    try:
        runtime.run(
            should_stop=lambda: (
                done["finished"] + done["dead_lettered"] >= count or time.monotonic() > deadline
            )
        )
    finally:
        runtime.close()
    return told


def test_one_id_from_two_publishers_is_two_requests_each_run_on_the_device(
    home: Home, fleet: FleetFactory
) -> None:
    # Knative's JobSink knows a request by (source, id): an id reused by another
    # publisher was silently skipped here as "already has a result".
    sim = fleet(1).simulator
    ours = new_request("reboot", devices=["sim-0001"], source="/site-a", request_id="job-1")
    theirs = new_request("reboot", devices=["sim-0001"], source="/site-b", request_id="job-1")
    _publish(home, [ours])
    told = _serve(Runtime(home.settings()), 1)
    _publish(home, [theirs])
    told += _serve(Runtime(home.settings()), 1)

    assert [kind for kind, _ in told if kind == "skipped"] == []
    log = home.log()
    try:
        consumer = log.consumer("check", Topics().results)
        events = [from_kafka(r.headers, r.key, r.value) for r in consumer.poll(100, 0.0)]
        sources = [e.request_source for e in events if isinstance(e, TaskCompleted)]
        consumer.close()
    finally:
        log.close()
    assert sorted(s or "" for s in sources) == ["/site-a", "/site-b"]
    # Each one's reboot applied: the second is not a replay of the first's key.
    assert len(sim.log()["sim-0001"]) == 2


class _RefusesOneResult(_RefusesFirstResults):
    """The runtime's log, refusing every result of one request only (as for a
    result too large for the topic), while it takes the others."""

    def __init__(self, log: EventLog, request_id: str) -> None:
        super().__init__(log, refusals=0)
        self._refused = request_id.encode()

    def append_many(self, records: list[tuple[str, bytes | None, bytes, Headers]]) -> None:
        for topic, key, _, headers in records:
            completed = ("ce_type", b"dev.mayfly.task.completed") in list(headers)
            if topic == self._results and key == self._refused and completed:
                raise EventLogError("record too large")  # its rejection is small
        self._log.append_many(records)


def test_a_result_the_log_refuses_while_it_takes_others_ends_dead_lettered(
    home: Home, fleet: FleetFactory
) -> None:
    # Waiting does not help a result that is refused on its own: it is counted
    # as a crash, so it ends, instead of running its devices again for ever.
    fleet(2)
    refused = new_request("reboot", devices=["sim-0001"])
    others = [new_request("reboot", devices=["sim-0002"], partition_key=f"o{i}") for i in range(4)]
    _publish(home, [refused, *others])
    runtime = Runtime(home.settings())
    runtime.log = _RefusesOneResult(runtime.log, refused.id)  # type: ignore[assignment]
    told = _serve(runtime, 5, crash_backoff_s=0.05, max_log_refusals=3)

    assert "dead_lettered" in _kinds(told, refused.id)
    assert all(_kinds(told, o.id)[-1] == "finished" for o in others)
