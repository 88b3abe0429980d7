"""A Mayfly home the CLI tests share: packages published, an inventory written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mayfly.devices.sim import Simulator
from mayfly.settings import Settings
from mayfly.testing import publish_folders

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("publish-checks")
    settings = Settings.from_env(dict(os.environ) | {"MAYFLY_HOME": str(home)})
    publish_folders(settings, [TASKPKGS / p for p in ("reboot", "firmware-update", "config-push")])
    (home / "inventory.json").write_bytes(Simulator(3).inventory("http://127.0.0.1:9").to_json())
    return home
