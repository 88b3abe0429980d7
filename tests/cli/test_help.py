"""``mayfly --help`` lists every command without importing one."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mayfly.cli import _COMMANDS, cli
from mayfly.cli._group import MayflyGroup

#: What a command's own code brings in; the group's help needs none of it.
HEAVY = ("aiohttp", "kubernetes", "yaml", "pydantic", "kafka", "jsonschema", "mayfly.events")

_PROBE = """
import json, sys
sys.argv = ["mayfly", "--help"]
from mayfly.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_the_group_help_imports_no_command_and_nothing_heavy() -> None:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    modules = json.loads(run.stderr.strip().splitlines()[-1])

    assert "publish" in run.stdout
    assert "deploy" in run.stdout
    assert [m for m in modules if m.startswith("mayfly.cli.") and m != "mayfly.cli._group"] == []
    assert [m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)] == []


@pytest.mark.parametrize("name", sorted(_COMMANDS))
def test_each_listed_short_help_is_the_commands_own(name: str) -> None:
    assert isinstance(cli, MayflyGroup)
    command = cli.get_command(click.Context(cli), name)
    assert command is not None
    assert command.get_short_help_str(limit=1000) == _COMMANDS[name][1]


def test_a_commands_own_help_still_works() -> None:
    result = CliRunner().invoke(cli, ["publish", "--help"])

    assert result.exit_code == 0, result.output
    assert "--no-validate" in result.output
