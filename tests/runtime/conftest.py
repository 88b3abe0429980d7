"""A Mayfly home with published packages, a simulated fleet, and `mayfly up` runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.eventlog import EventLog
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import (
    TaskCompleted,
    TaskProgress,
    TaskRejected,
    from_kafka,
    new_request,
    to_kafka_record,
)
from mayfly.settings import Settings
from mayfly.testing import publish_folders
from mayfly.topics import Topics

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@dataclass
class Home:
    root: Path
    inventory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        # os.environ is already clean: tests/conftest.py's isolated_environment.
        env = dict(os.environ)
        env |= {"MAYFLY_HOME": str(self.root), "MAYFLY_INVENTORY": str(self.inventory)}
        return env | extra

    def settings(self, **extra: str) -> Settings:
        return Settings.from_env(self.env(**extra))

    def log(self) -> SqliteEventLog:
        return SqliteEventLog(self.root / "events.db")

    def up(self, *args: str) -> subprocess.Popen[bytes]:
        return self.up_with(*args)

    def up_with(
        self, *args: str, output: Path | None = None, **env: str
    ) -> subprocess.Popen[bytes]:
        """``mayfly up ARGS`` with ``env`` added to the home's settings; its output
        goes to ``output`` if given (a pipe fills up on a long ``-v`` run)."""
        with contextlib.ExitStack() as files:
            sink = files.enter_context(output.open("wb")) if output else subprocess.PIPE
            process = subprocess.Popen(
                [sys.executable, "-m", "mayfly.cli", "up", *args],
                env=self.env(**env),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def results(self) -> dict[str, TaskCompleted | TaskRejected]:
        """Every request id with a result on the results topic."""
        log = self.log()
        try:
            consumer = log.consumer(f"test-{time.monotonic_ns()}", Topics().results)
            found: dict[str, TaskCompleted | TaskRejected] = {}
            while records := consumer.poll(1000, 0.0):
                for record in records:
                    event = from_kafka(record.headers, record.key, record.value)
                    if isinstance(event, TaskProgress):
                        continue  # news of a running request, not an outcome
                    assert isinstance(event, TaskCompleted | TaskRejected)
                    found[str(event.request_id)] = event
            consumer.close()
            return found
        finally:
            log.close()

    def wait_for_results(self, ids: set[str], timeout_s: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while True:
            results = self.results()
            if ids <= set(results) or time.monotonic() > deadline:
                return dict(results)
            time.sleep(0.2)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(root=tmp_path / "home", inventory=tmp_path / "inventory.json")
    publish_folders(h.settings(), [TASKPKGS / "reboot", TASKPKGS / "config-push"])
    yield h
    for process in h.processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


@pytest.fixture
def fleet(home: Home) -> Iterator[Callable[..., SimulatorServer]]:
    servers: list[SimulatorServer] = []

    def start(count: int, **kwargs: object) -> SimulatorServer:
        kwargs.setdefault("reboot_time", 0.05)
        server = SimulatorServer(Simulator(count, **kwargs)).start()  # type: ignore[arg-type]
        servers.append(server)
        home.inventory.write_bytes(server.inventory().to_json())
        return server

    yield start
    for server in servers:
        server.stop()


def config_pushes(log: EventLog, topics: Topics, devices: list[str], count: int) -> list[str]:
    """Publish ``count`` config pushes, round-robin over ``devices``; each device's
    ``telemetry_interval_s`` rises with every request it gets (for order checks).
    Returns their ids, in publish order."""
    ids = []
    batch: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
    for n in range(count):
        device = devices[n % len(devices)]
        request = new_request(
            "config-push",
            devices=[device],
            params={"config": {"telemetry_interval_s": 5 + n // len(devices)}},
        )
        ids.append(request.id)
        batch.append((topics.lane(request.priority), *to_kafka_record(request)))
        if len(batch) == 200:
            log.append_many(batch)
            batch = []
    log.append_many(batch)
    return ids
