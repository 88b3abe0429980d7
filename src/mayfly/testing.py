"""Helpers for tests and benchmarks: a Mayfly home with signed packages in it,
and a package folder run on simulated devices.

::

    settings = Settings.from_env({"MAYFLY_HOME": str(tmp_path / "home")})
    publish_folders(settings, [Path("taskpkgs/reboot")])   # key made and trusted

    outcome = run_folder(Path("mypkg"), devices=3, params={"level": "debug"})
    assert outcome.status.value == "succeeded"

The same helpers the demo and ``mayfly pkg run`` use
(:mod:`mayfly.app.publishing`, :mod:`mayfly.app.devrun`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mayfly.app.devrun import dev_run, simulated_inventory
from mayfly.app.publishing import ensure_signing_key, publish_folder, publish_folders
from mayfly.coordinator.pipeline import Outcome
from mayfly.settings import Settings

__all__ = ["ensure_signing_key", "publish_folder", "publish_folders", "run_folder"]


def run_folder(
    folder: Path, *, devices: int = 3, params: Mapping[str, Any] | None = None
) -> Outcome:
    """Run the package in ``folder`` as ``mayfly pkg run --sim N`` does: built,
    checked, and run by a coordinator on ``devices`` simulated devices
    (``sim-0001``, ...) served for the run; the outcome.

    Raises:
        MayflyError: the folder does not build or check.
    """
    with tempfile.TemporaryDirectory(prefix="mayfly-test-") as scratch:
        settings = Settings.from_env({"MAYFLY_HOME": str(Path(scratch) / "home")})
        with simulated_inventory(devices, Path(scratch)) as inventory:
            ids = [f"sim-{n:04d}" for n in range(1, devices + 1)]
            return dev_run(settings, folder, inventory, devices=ids, params=params)
