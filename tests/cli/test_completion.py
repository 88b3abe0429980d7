"""Shell completion: commands, published task types and inventory device ids."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.shell_completion import ShellComplete

from mayfly.cli import cli


def _complete(args: list[str], incomplete: str) -> list[str]:
    completer = ShellComplete(cli, {}, "mayfly", "_MAYFLY_COMPLETE")
    return [item.value for item in completer.get_completions(args, incomplete)]


@pytest.fixture
def settings_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    monkeypatch.setenv("MAYFLY_INVENTORY", str(home / "inventory.json"))


def test_commands_complete() -> None:
    assert _complete([], "pu") == ["publish"]


@pytest.mark.usefixtures("settings_env")
def test_publish_completes_published_task_types_and_inventory_devices() -> None:
    assert _complete(["publish"], "") == ["config-push", "firmware-update", "reboot"]
    assert _complete(["publish"], "fi") == ["firmware-update"]
    assert _complete(["publish", "reboot", "-d"], "sim-000") == ["sim-0001", "sim-0002", "sim-0003"]
    assert _complete(["deploy"], "re") == ["reboot"]


def test_a_home_with_nothing_completes_to_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAYFLY_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("MAYFLY_INVENTORY", str(tmp_path / "missing.json"))

    assert _complete(["publish"], "") == []
    assert _complete(["publish", "reboot", "-d"], "") == []
