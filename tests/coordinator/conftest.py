"""A simulated fleet, a signing key and a local package store for coordinator tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from mayfly.app.wiring import open_repository
from mayfly.coordinator import Coordinator, CoordinatorOptions
from mayfly.coordinator.runner import TaskStarter
from mayfly.devices.http import HttpDriver
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.packages import PackageRepository
from mayfly.settings import Settings
from mayfly.testing import publish_folder, publish_folders

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@dataclass
class Env:
    """A Mayfly home with a trusted key, a store, and the fleet's inventory."""

    home: Path
    inventory: Path
    results: Path
    starter: TaskStarter | None = None
    """Where its coordinators' task processes come from (None: forked from them)."""

    def variables(self) -> dict[str, str]:
        # os.environ is already clean: tests/conftest.py's isolated_environment.
        env = dict(os.environ)
        env.update(
            MAYFLY_HOME=str(self.home),
            MAYFLY_INVENTORY=str(self.inventory),
            MAYFLY_RESULT_SINK=str(self.results),
        )
        return env

    def settings(self) -> Settings:
        return Settings.from_env(self.variables())

    def repository(self) -> PackageRepository:
        return open_repository(self.settings())

    def publish(self, folder: Path) -> None:
        publish_folder(self.settings(), folder)

    def coordinator(self, **options: object) -> Coordinator:
        settings = self.settings()
        from mayfly.app.wiring import load_inventory

        return Coordinator(
            self.repository(),
            inventory=lambda: load_inventory(settings),
            driver_factory=HttpDriver,
            options=CoordinatorOptions(
                cache_dir=settings.package_cache,
                mode="test",
                retry_backoff_s=0.05,
                **options,  # type: ignore[arg-type]
            ),
            starter=self.starter,
        )

    def result_events(self) -> list[dict[str, object]]:
        if not self.results.exists():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def make_env(tmp_path: Path) -> Env:
    """A fresh :class:`Env` below ``tmp_path``, with the example packages published."""
    e = Env(
        home=tmp_path / "home",
        inventory=tmp_path / "inventory.json",
        results=tmp_path / "results.jsonl",
    )
    names = ("reboot", "firmware-update", "config-push")
    publish_folders(e.settings(), [TASKPKGS / name for name in names])
    return e


FleetFactory = Callable[..., SimulatorServer]


@pytest.fixture
def fleet(env: Env) -> Iterator[FleetFactory]:
    """Start a simulator (fast reboots and downloads) and write its inventory."""
    servers: list[SimulatorServer] = []

    def start(count: int, **kwargs: object) -> SimulatorServer:
        kwargs.setdefault("reboot_time", 0.1)
        kwargs.setdefault("download_time", 0.2)
        server = SimulatorServer(Simulator(count, **kwargs)).start()  # type: ignore[arg-type]
        servers.append(server)
        env.inventory.write_bytes(server.inventory().to_json())
        return server

    yield start
    for server in servers:
        server.stop()


def write_package(
    folder: Path, manifest: Mapping[str, object], code: str, module: str = "task"
) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / f"{module}.py").write_text(code)
    return folder
