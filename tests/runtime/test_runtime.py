"""The local runtime end to end: crashes, priorities, scale to zero."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mayfly.app.local import Runtime
from mayfly.devices import idempotency_key
from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, new_request

from ..conftest import processes_of
from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def test_sigkill_mid_run_loses_nothing_and_applies_nothing_twice(
    home: Home, fleet: FleetFactory
) -> None:
    sim = fleet(20, latency_ms=20).simulator
    requests = [
        new_request("reboot", devices=[f"sim-{(i % 20) + 1:04d}"], params={"max_wait_s": 10})
        for i in range(60)
    ]
    log = home.log()
    for request in requests:
        publish_request(log, request)
    log.close()
    ids = {r.id for r in requests}

    first = home.up("--max-coordinators", "4")
    deadline = time.monotonic() + 60
    while len(home.results()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = _descendants(first.pid)
    assert tree, "coordinators should be running mid-run"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    time.sleep(0.5)
    # The whole tree died with the runtime: no orphan keeps acting on devices.
    assert [p for p in tree if _alive(p)] == []
    done_before = len(home.results())
    assert done_before < len(ids)

    second = home.up("--max-coordinators", "4")
    results = home.wait_for_results(ids, timeout_s=120)
    second.send_signal(signal.SIGTERM)
    second.wait(timeout=30)

    # Nothing of either run is left: no coordinator or task process escaped,
    # whenever the kill landed.
    time.sleep(2.5)
    assert processes_of(home.root) == []
    assert set(results) == ids, f"lost: {ids - set(results)}"
    assert all(isinstance(r, TaskCompleted) and r.status == "succeeded" for r in results.values())
    assert sim.duplicates() == []
    log_by_device = sim.log()
    for request in requests:
        device = request.devices[0]
        key = idempotency_key(request.id, device, "reboot", 0, source=request.source)
        applied = [e for e in log_by_device[device] if e["key"] == key]
        assert len(applied) == 1, (request.id, device, applied)
    # One archived record and one trace each, whatever the kill cut short.
    files = (home.root / "archive").glob("*.jsonl")
    lines = [line for f in files for line in f.read_text().splitlines()]
    archived = Counter(json.loads(line)["data"]["request_id"] for line in lines)
    assert archived == dict.fromkeys(ids, 1)
    roots: dict[str, set[str]] = {}
    for line in (home.root / "telemetry" / "traces.jsonl").read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            for span in resource["scopeSpans"][0]["spans"]:
                attributes = {a["key"]: a["value"] for a in span["attributes"]}
                if "mayfly.request.id" in attributes:
                    rid = attributes["mayfly.request.id"]["stringValue"]
                    roots.setdefault(rid, set()).add(span["traceId"])
    assert set(roots) == ids, f"no trace: {ids - set(roots)}"
    assert [rid for rid, traces in roots.items() if len(traces) != 1] == []


def test_high_priority_overtakes_a_low_backlog(home: Home, fleet: FleetFactory) -> None:
    fleet(1)
    log = home.log()
    lows = [
        new_request(
            "config-push",
            devices=["sim-0001"],
            priority="low",
            params={"config": {"log_level": "info"}},
            partition_key=f"k{i}",
        )
        for i in range(1000)
    ]
    for request in lows:
        publish_request(log, request)
    high = new_request("reboot", devices=["sim-0001"], priority="high", partition_key="kh")
    publish_request(log, high)
    log.close()

    started: list[str] = []
    high_done = threading.Event()

    def on_dispatch(kind: str, info: dict[str, object]) -> None:
        if kind == "started":
            started.append(str(info["request_id"]))
        if kind == "finished" and info["request_id"] == high.id:
            high_done.set()

    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS="2"), on_dispatch=on_dispatch)
    runtime.start()
    try:
        runtime.run(should_stop=lambda: high_done.is_set() or len(started) > 200)
    finally:
        runtime.close()
    assert high.id in started
    position = started.index(high.id)
    assert position < 5, position  # among the first few starts, not after 1,000 lows
    assert len(started) < 1001


def test_idle_runtime_keeps_no_coordinator_alive(home: Home, fleet: FleetFactory) -> None:
    fleet(2)
    log = home.log()
    requests = [new_request("reboot", devices=[f"sim-000{i}"]) for i in (1, 2)]
    for request in requests:
        publish_request(log, request)
    log.close()
    finished: Counter[str] = Counter()

    def on_dispatch(kind: str, _info: dict[str, object]) -> None:
        finished[kind] += 1

    runtime = Runtime(home.settings(), on_dispatch=on_dispatch)
    runtime.start()
    try:
        runtime.run(should_stop=lambda: finished["finished"] == 2)
        time.sleep(0.2)
        # Only the warm parent remains, with its task zygote: every coordinator
        # and every task process exited with its request.
        alive = [p for p in _children(os.getpid()) if _alive(p)]
        assert alive == [runtime.spawner.pid]
        [zygote] = [p for p in _children(alive[0]) if _alive(p)]
        assert b"mayfly.coordinator.zygote" in Path(f"/proc/{zygote}/cmdline").read_bytes()
        assert [p for p in _children(zygote) if _alive(p)] == []
    finally:
        runtime.close()


def _loaded(pid: int) -> str:
    """Every file mapped into a process: its shared libraries among them."""
    return Path(f"/proc/{pid}/maps").read_text()


def test_mayfly_up_holds_none_of_the_coordinators_code(home: Home, fleet: FleetFactory) -> None:
    # The package store's signing (cryptography) and params schemas (jsonschema,
    # whose referencing needs rpds) are the warm parent's: `mayfly up` stays small.
    fleet(1)
    up = home.up()
    log = home.log()
    request = new_request("reboot", devices=["sim-0001"])
    publish_request(log, request)
    log.close()
    try:
        home.wait_for_results({request.id}, 60)
        [warm] = [p for p in _children(up.pid) if "mayfly.spanexport" not in _cmdline(p)]
        assert "cryptography" in _loaded(warm)  # it verified the package it ran
        assert "cryptography" not in _loaded(up.pid)
        assert "rpds" not in _loaded(up.pid)
    finally:
        up.terminate()
        up.wait(timeout=30)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_a_second_mayfly_up_on_one_embedded_log_is_refused_and_the_first_serves_on(
    home: Home, fleet: FleetFactory
) -> None:
    fleet(1)
    said = home.root.parent / "first.log"
    first = home.up_with(output=said)
    log = home.log()
    try:
        deadline = time.monotonic() + 30
        while b"mayfly up:" not in said.read_bytes():
            assert first.poll() is None, said.read_text()
            assert time.monotonic() < deadline, "the first never started"
            time.sleep(0.1)
        second = home.up()
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0, out
        assert f"already served by process {first.pid}".encode() in out, out
        assert b"Traceback" not in out, out
        # The first one was not disturbed: it still runs what is published.
        request = new_request("reboot", devices=["sim-0001"])
        publish_request(log, request)
        assert request.id in home.wait_for_results({request.id}, timeout_s=30)
    finally:
        log.close()
