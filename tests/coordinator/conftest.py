"""A simulated fleet, a signing key and a local package store for coordinator tests."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mayfly.backends import open_repository
from mayfly.coordinator import Coordinator, CoordinatorOptions
from mayfly.devices.http import HttpDriver
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.packages import (
    PackageRepository,
    build_package,
    generate_keypair,
    load_private_key,
    sign_built,
)
from mayfly.settings import Settings

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@dataclass
class Env:
    """A Mayfly home with a trusted key, a store, and the fleet's inventory."""

    home: Path
    inventory: Path
    results: Path

    def variables(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAYFLY_", "TASK_"))}
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
        built = build_package(folder)
        key = load_private_key(self.home / "keys" / "signing.key")
        repo = self.repository()
        repo.publish(built, sign_built(key, built))
        repo.promote(built.manifest.name, built.manifest.version, "stable")

    def coordinator(self, **options: object) -> Coordinator:
        settings = self.settings()
        from mayfly.backends import load_inventory

        return Coordinator(
            self.repository(),
            inventory=lambda: load_inventory(settings),
            driver_factory=HttpDriver,
            options=CoordinatorOptions(
                cache_dir=settings.package_cache, mode="test", retry_backoff_s=0.05, **options
            ),  # type: ignore[arg-type]
        )

    def result_events(self) -> list[dict[str, object]]:
        if not self.results.exists():
            return []
        return [json.loads(line) for line in self.results.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    home = tmp_path / "home"
    generate_keypair(home / "keys" / "signing.key", home / "trusted" / "signing.pub")
    e = Env(home=home, inventory=tmp_path / "inventory.json", results=tmp_path / "results.jsonl")
    for name in ("reboot", "firmware-update", "config-push"):
        e.publish(TASKPKGS / name)
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
    folder: Path, manifest: dict[str, object], code: str, module: str = "task"
) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / f"{module}.py").write_text(code)
    return folder
