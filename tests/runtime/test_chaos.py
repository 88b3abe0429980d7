"""Chaos: ``kill -9`` of every part of a running Mayfly, and nothing shows.

A stream of config pushes (one device each, round-robin over a simulated
fleet) runs through ``mayfly up`` while a seeded killer sends SIGKILL at
random moments to a coordinator, a task process, the warm parent or the
runtime itself (which is then started again, as a supervisor would); on
Kafka the broker is killed once too and started again on its data. When
every request has its result, what a user would check is checked:

- every request has exactly one archived result, and it succeeded: nothing
  lost, nothing archived twice, no false dead letter (a crash counted
  against a request whose device had acted);
- every request has exactly one trace;
- no device applied an action twice, and none saw one idempotency key
  arrive from two runs that both acted;
- no process of the runtime is left once it stopped.

Sized for CI (1,000 requests); ``make chaos`` runs it with
``MAYFLY_CHAOS_REQUESTS=10000`` and prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mayfly.app.wiring import open_event_log
from mayfly.devices.sim import SimulatorServer
from mayfly.topics import Topics

from ..conftest import processes_of
from .conftest import Home, config_pushes

FleetFactory = Callable[..., SimulatorServer]

REQUESTS = int(os.environ.get("MAYFLY_CHAOS_REQUESTS", "1000"))
SEED = int(os.environ.get("MAYFLY_CHAOS_SEED", "7"))
DEVICES = 100
SERVICES = Path(__file__).parents[2] / "dev" / "services"


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X") and int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _roles(main: int) -> dict[str, list[int]]:
    """The runtime's processes by role, from the process tree under ``main``."""
    roles: dict[str, list[int]] = {"main": [main], "warm": [], "coordinator": [], "task": []}
    for child in _children(main):
        if _cmdline(child) == _cmdline(main):  # forked: the warm parent
            roles["warm"].append(child)
    for warm in roles["warm"]:
        for child in _children(warm):
            if b"zygote" in _cmdline(child):
                roles["task"] += _children(child)
            else:
                roles["coordinator"].append(child)
    return roles


def _archived(home: Path) -> list[dict[str, object]]:
    """Every whole line of the archive (a torn last line is left out, as readers do)."""
    records = []
    for day in sorted((home / "archive").glob("*.jsonl")):
        for line in day.read_bytes().split(b"\n")[:-1]:
            if line.strip():
                records.append(json.loads(line))
    return records


def _traces(trace_file: Path) -> dict[str, set[str]]:
    """Trace ids by request id, from the root spans in the trace file."""
    traces: dict[str, set[str]] = {}
    if not trace_file.exists():
        return traces
    for line in trace_file.read_bytes().split(b"\n"):
        try:
            batch = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill: its results were traced again after it
        for resource in batch["resourceSpans"]:
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    for attribute in span["attributes"]:
                        if attribute["key"] == "mayfly.request.id":
                            rid = attribute["value"]["stringValue"]
                            traces.setdefault(rid, set()).add(span["traceId"])
    return traces


@dataclass
class Chaos:
    """The killer: SIGKILL at random moments, the runtime started again after its own."""

    home: Home
    env: dict[str, str]
    rng: random.Random
    broker_kill_at: float | None = None
    kills: Counter[str] = field(default_factory=Counter)
    up: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    #: Runtime kills this far apart at least: on Kafka each costs a rejoin of
    #: both groups (the dead member's 10 s session), and back to back they
    #: would leave no time to serve.
    main_gap_s: float = 5.0
    last_main_kill: float = 0.0

    def start_up(self) -> None:
        log = self.home.root / f"up-{self.restarts}.log"
        self.up = self.home.up_with(output=log, **self.env)
        self.restarts += 1

    def run(self, progress: Callable[[], float]) -> None:
        broker_killed = False
        while not self.stop.wait(self.rng.uniform(0.2, 1.2)):
            assert self.up is not None
            due = self.broker_kill_at is not None and not broker_killed
            if due and progress() >= (self.broker_kill_at or 0.0):
                broker_killed = True
                self._kill_broker()
                continue
            roles = _roles(self.up.pid)
            # Mostly the short-lived parts; now and then the long-lived ones.
            role = self.rng.choices(["coordinator", "task", "warm", "main"], [5, 4, 1, 1])[0]
            if not roles[role]:
                continue
            if role == "main" and time.monotonic() - self.last_main_kill < self.main_gap_s:
                continue  # let the last start rejoin and make progress first
            if role == "main":
                self.last_main_kill = time.monotonic()
            pid = self.rng.choice(roles[role])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills[role] += 1
            if role == "main":
                self.up.wait(timeout=30)
                time.sleep(self.rng.uniform(0.0, 1.0))
                self.start_up()

    def _kill_broker(self) -> None:
        subprocess.run(
            [sys.executable, str(SERVICES), "restart", "kafka", "--kill", "--down-s", "5"],
            check=True,
            timeout=180,
        )
        self.kills["broker"] += 1


def _publish(env: dict[str, str], home: Home, topics: Topics, devices: list[str]) -> list[str]:
    with open_event_log(home.settings(**env)) as log:
        return config_pushes(log, topics, devices, REQUESTS)


@pytest.mark.parametrize("log", ["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_kill_9_of_any_part_loses_nothing_and_doubles_nothing(
    home: Home, fleet: FleetFactory, log: str, request: pytest.FixtureRequest
) -> None:
    server = fleet(DEVICES, reboot_time=0.01)
    env: dict[str, str] = {}
    topics = Topics()
    if log == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        topics = Topics(f"mayfly-chaos-{uuid.uuid4().hex[:8]}")
        env = {"MAYFLY_EVENT_LOG": f"kafka://{bootstrap}", "MAYFLY_TOPIC_PREFIX": topics.prefix}
    rng = random.Random(f"{SEED}-{log}")
    chaos = Chaos(home, env, rng, broker_kill_at=0.4 if log == "kafka" else None)
    chaos.main_gap_s = 20.0 if log == "kafka" else 5.0
    chaos.start_up()
    ids = _publish(env, home, topics, server.simulator.device_ids())

    def progress() -> float:
        return len({r["data"]["request_id"] for r in _archived(home.root)}) / REQUESTS  # type: ignore[index]

    killer = threading.Thread(target=chaos.run, args=(progress,), daemon=True)
    started = time.monotonic()
    killer.start()
    deadline = started + 180 + REQUESTS * 0.15
    while progress() < 1.0 and time.monotonic() < deadline:
        time.sleep(1.0)
    chaos.stop.set()
    killer.join(timeout=240)
    elapsed = time.monotonic() - started
    # Anything still on its way (a run again) has time to land.
    time.sleep(3)
    assert chaos.up is not None
    chaos.up.terminate()
    chaos.up.wait(timeout=60)
    time.sleep(2.5)
    leftover = processes_of(home.root)

    records = _archived(home.root)
    per_request = Counter(str(r["data"]["request_id"]) for r in records)  # type: ignore[index]
    lost = set(ids) - set(per_request)
    twice = {rid: n for rid, n in per_request.items() if n > 1}
    not_ok = [r for r in records if r["type"] != "dev.mayfly.task.completed"]
    not_ok += [r for r in records if r["data"].get("status") != "succeeded"]  # type: ignore[union-attr]
    traces = _traces(home.root / "telemetry" / "traces.jsonl")
    untraced = set(ids) - set(traces)
    many_traces = [rid for rid, found in traces.items() if len(found) != 1]
    sim = server.simulator
    applied_twice = sim.duplicates()
    arrivals = [
        (device, key, n)
        for device in sim.device_ids()
        for key, n in sim.records(device)["arrivals"].items()
        if n > 1
    ]
    figures = {
        "log": log,
        "requests": REQUESTS,
        "seconds": round(elapsed, 1),
        "kills": dict(chaos.kills),
        "runtime_starts": chaos.restarts,
        "lost": len(lost),
        "duplicate_archive_records": sum(n - 1 for n in twice.values()),
        "false_dead_letters_or_failures": len(not_ok),
        "untraced": len(untraced),
        "requests_with_more_than_one_trace": len(many_traces),
        "duplicate_device_actions": len(applied_twice),
        "keys_arriving_more_than_once": len(arrivals),
        "leftover_processes": len(leftover),
    }
    print(f"\nchaos: {json.dumps(figures)}")
    tails = "\n".join(
        p.read_text(errors="replace")[-2000:] for p in sorted(home.root.glob("up-*.log"))[-2:]
    )
    assert sum(chaos.kills.values()) > 0, figures
    assert not lost, f"{figures}\nlost {sorted(lost)[:5]}\n{tails}"
    assert not twice, f"{figures}\narchived twice {list(twice.items())[:5]}"
    assert not not_ok, f"{figures}\n{not_ok[:3]}"
    assert not untraced, f"{figures}\nno trace {sorted(untraced)[:5]}"
    assert not many_traces, f"{figures}\n{many_traces[:5]}"
    assert applied_twice == [], figures
    assert leftover == [], figures
