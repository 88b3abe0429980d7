"""Settings: one list of options, each with a variable and (mostly) a flag, read once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mayfly.cli import cli
from mayfly.errors import ConfigError
from mayfly.runtime.spawner import ForkedWork, Spawner
from mayfly.settings import OPTIONS, Settings

README = Path(__file__).parents[1] / "README.md"


def _readme_rows() -> dict[str, str]:
    rows = re.findall(
        r"^\| `([A-Z0-9_]+)` \| ((?:`--[a-z0-9-]+`)|\(none\)) \|", README.read_text(), re.M
    )
    counted: dict[str, str] = {}
    for env, flag in rows:
        assert env not in counted, f"{env} is listed twice in the README"
        counted[env] = flag.strip("`")
    return counted


def test_the_readme_lists_every_setting_once_with_its_flag_and_variable() -> None:
    assert _readme_rows() == {o.env: o.flag or "(none)" for o in OPTIONS}


def _help_of_every_command() -> str:
    texts: list[str] = []

    def walk(command: click.Command, path: list[str]) -> None:
        with click.Context(command, info_name=" ".join(path)) as ctx:
            texts.append(command.get_help(ctx))
            subs = (
                {n: command.get_command(ctx, n) for n in command.list_commands(ctx)}
                if isinstance(command, click.Group)
                else {}
            )
        for name, sub in subs.items():
            assert sub is not None, name
            walk(sub, [*path, name])

    walk(cli, ["mayfly"])
    return "\n".join(texts)


def test_every_flag_is_offered_and_its_help_names_its_variable() -> None:
    text = " ".join(_help_of_every_command().split())
    for opt in OPTIONS:
        if opt.flag is None:
            continue
        assert re.search(rf"{re.escape(opt.flag)}\b.{{0,300}}?\[env: {opt.env};", text), opt.flag


def test_a_flag_wins_over_its_variable_and_home_moves_the_defaults(tmp_path: Path) -> None:
    env = {"MAYFLY_HOME": str(tmp_path / "a"), "MAYFLY_STORE": "/from/env"}
    settings = Settings.from_env(env, {"home": str(tmp_path / "b"), "store": None})
    assert settings.home == tmp_path / "b"
    assert settings.store == "/from/env"
    assert settings.event_log == str(tmp_path / "b" / "events.db")
    assert Settings.from_env(env, {"store": "s3://bucket"}).store == "s3://bucket"
    trusted = Settings.from_env(env, {"trusted_keys": ("/k1", "/k2")}).trusted_keys
    assert trusted == (Path("/k1"), Path("/k2"))


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("MAYFLY_MAX_COORDINATORS", "many", "MAYFLY_MAX_COORDINATORS"),
        ("MAYFLY_PER_TASK_CAP", "0", "MAYFLY_PER_TASK_CAP"),
        ("MAYFLY_TOPIC_PREFIX", "my topics", "MAYFLY_TOPIC_PREFIX"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_its_variable(
    variable: str, value: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({variable: value})


def _mayfly(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # os.environ is already clean: tests/conftest.py's isolated_environment.
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", *args],
        env=dict(os.environ) | {"MAYFLY_HOME": str(tmp_path / "home")} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_with_an_s3_store_and_no_credentials_says_so_in_one_line(tmp_path: Path) -> None:
    run = _mayfly(tmp_path, "up", "--store", "s3://x")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "error: s3://x needs MAYFLY_S3_ENDPOINT (--s3-endpoint), MAYFLY_S3_ACCESS_KEY "
        "(--s3-access-key) and MAYFLY_S3_SECRET_KEY to be set"
    ]
    assert not (tmp_path / "home" / "runtime").exists(), "nothing should have started"


def test_a_bad_number_in_the_environment_is_one_line_and_exit_2(tmp_path: Path) -> None:
    run = _mayfly(tmp_path, "pkg", "list", MAYFLY_MAX_PROCESSES="lots")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "error: MAYFLY_MAX_PROCESSES='lots': expected a positive whole number"
    ]


def _refuses() -> ForkedWork:
    raise ConfigError("MAYFLY_STORE='s3://': expected s3://BUCKET")


def test_a_config_error_in_the_warm_parent_reaches_the_runtime_as_one() -> None:
    spawner = Spawner(_refuses)
    with pytest.raises(ConfigError, match=r"expected s3://BUCKET"):
        spawner.start(timeout_s=30)
    assert spawner.pid is None, "the warm parent should be gone"


def test_an_unknown_coordinator_mode_is_one_bounded_line_and_exit_2(tmp_path: Path) -> None:
    for args, env in (
        (("--coordinator-mode", "fast"), {}),
        ((), {"MAYFLY_COORDINATOR_MODE": "x" * 5000}),
    ):
        run = _mayfly(tmp_path, "up", *args, **env)
        assert run.returncode == 2, run.stderr
        [line] = run.stderr.splitlines()
        assert line.startswith("error: MAYFLY_COORDINATOR_MODE=")
        assert line.endswith(": expected one of serve, strict")
        assert len(line) < 120
    assert not (tmp_path / "home" / "runtime").exists(), "nothing should have started"


@pytest.mark.parametrize(
    "raw", ["reboot", "reboot=0", "reboot=1001", "reboot=1,reboot=2", "Bad Name=1", "x=-1"]
)
def test_task_weights_out_of_bounds_are_refused_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="MAYFLY_TASK_WEIGHTS"):
        Settings.from_env({"MAYFLY_TASK_WEIGHTS": raw})


def test_task_weights_are_read_by_type() -> None:
    settings = Settings.from_env({"MAYFLY_TASK_WEIGHTS": " firmware-update=3, reboot=1 "})
    assert dict(settings.task_weights) == {"firmware-update": 3, "reboot": 1}
