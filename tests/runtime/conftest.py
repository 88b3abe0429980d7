"""A Mayfly home with published packages, a simulated fleet, and `mayfly up` runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mayfly.backends import open_repository
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.events import TaskCompleted, TaskRejected, from_kafka
from mayfly.packages import build_package, generate_keypair, load_private_key, sign_built
from mayfly.runtime.eventlog import RESULTS_TOPIC
from mayfly.runtime.sqlitelog import SqliteEventLog
from mayfly.settings import Settings

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@dataclass
class Home:
    root: Path
    inventory: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAYFLY_", "TASK_"))}
        env |= {"MAYFLY_HOME": str(self.root), "MAYFLY_INVENTORY": str(self.inventory)}
        return env | extra

    def settings(self, **extra: str) -> Settings:
        return Settings.from_env(self.env(**extra))

    def publish_package(self, folder: Path) -> None:
        built = build_package(folder)
        repo = open_repository(self.settings())
        repo.publish(built, sign_built(load_private_key(self.root / "keys" / "signing.key"), built))
        repo.promote(built.manifest.name, built.manifest.version, "stable")

    def log(self) -> SqliteEventLog:
        return SqliteEventLog(self.root / "events.db")

    def up(self, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "mayfly.cli", "up", *args],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def results(self) -> dict[str, TaskCompleted | TaskRejected]:
        """Every request id with a result on the results topic."""
        log = self.log()
        try:
            consumer = log.consumer(f"test-{time.monotonic_ns()}", RESULTS_TOPIC)
            found: dict[str, TaskCompleted | TaskRejected] = {}
            while records := consumer.poll(1000, 0.0):
                for record in records:
                    event = from_kafka(record.headers, record.key, record.value)
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
    root = tmp_path / "home"
    generate_keypair(root / "keys" / "signing.key", root / "trusted" / "signing.pub")
    h = Home(root=root, inventory=tmp_path / "inventory.json")
    for name in ("reboot", "config-push"):
        h.publish_package(TASKPKGS / name)
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
