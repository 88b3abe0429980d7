"""``mayfly publish`` checks each request as its coordinator will, before any reaches the log.

A home with the three shipped packages published and an inventory of three
simulated devices (``conftest.py``; nothing needs to answer: no device is called). Each
mistake an operator makes must end in a non-zero exit and a sentence naming
it, with the log left without a single request.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mayfly.cli import cli
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.topics import Topics


def _publish(home: Path, tmp_path: Path, *args: str, served: bool = True) -> tuple[int, str, Path]:
    """``mayfly publish ARGS`` to a log of its own, which a runtime has opened
    (made) unless ``served`` is False."""
    log = tmp_path / "events.db"
    if served and not log.exists():
        with SqliteEventLog(log) as made:
            made.check()
    env = {
        "MAYFLY_HOME": str(home),
        "MAYFLY_INVENTORY": str(home / "inventory.json"),
        "MAYFLY_EVENT_LOG": str(log),
    }
    result = CliRunner(env=env).invoke(cli, ["publish", *args])
    return result.exit_code, result.output, log


def _requests_in(log: Path) -> int:
    if not log.exists():
        return 0
    with SqliteEventLog(log) as events:
        return sum(len(events.consumer("check", lane).poll(100)) for lane in Topics().lanes())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["rebot", "-d", "sim-0001"], ["rebot: package not published", "did you mean 'reboot'?"]),
        (
            ["reboot", "-d", "sim-0001", "--version", "9.9.9"],
            ["reboot 9.9.9: version not published", "published versions: 1.0.0"],
        ),
        (["reboot", "-d", "sim-0009"], ["unknown device(s) (1): sim-0009"]),
        (["reboot", "-s", "site=nowhere"], ["no device matches selector {'site': 'nowhere'}"]),
        (
            ["config-push", "-d", "sim-0001", "-p", 'config={"log_level": "loud"}'],
            ["params.config.log_level: 'loud' is not one of"],
        ),
        (
            ["firmware-update", "-d", "sim-0001", "-p", "verison=2.0.0"],
            ["'version' is a required property", "unknown param 'verison' (did you mean"],
        ),
        (["reboot", "-d", "sim-0001", "--channel", "beta"], ["no channel 'beta'"]),
    ],
)
def test_a_mistake_is_named_and_nothing_is_published(
    home: Path, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    code, output, log = _publish(home, tmp_path, *args)

    assert code == 1, output
    for word in words:
        assert word in output, output
    assert "nothing was published" in output
    assert _requests_in(log) == 0


def test_one_bad_request_in_a_count_publishes_none(home: Path, tmp_path: Path) -> None:
    code, output, log = _publish(home, tmp_path, "reboot", "-d", "sim-0009", "--count", "3")

    assert code == 1
    assert "request 1 of 3 (reboot)" in output
    assert _requests_in(log) == 0


def test_a_good_request_is_published(home: Path, tmp_path: Path) -> None:
    code, output, log = _publish(home, tmp_path, "reboot", "-s", "site=lab-a", "--count", "2")

    assert code == 0, output
    assert output.count("published ") == 2
    assert _requests_in(log) == 2


def test_no_validate_publishes_what_the_runtime_will_reject(home: Path, tmp_path: Path) -> None:
    code, output, log = _publish(home, tmp_path, "rebot", "-d", "sim-0001", "--no-validate")

    assert code == 0, output
    assert _requests_in(log) == 1


def test_a_log_no_runtime_has_made_is_named_and_not_made(home: Path, tmp_path: Path) -> None:
    code, output, log = _publish(home, tmp_path, "reboot", "-d", "sim-0001", served=False)

    assert code == 1, output
    assert f"no runtime has initialised the event log {log} (no such file)" in output
    assert "nothing was published" in output
    assert not log.exists()
    # For a publisher that knows a runtime will start on it later.
    code, output, log = _publish(
        home, tmp_path, "reboot", "-d", "sim-0001", "--no-validate", served=False
    )
    assert code == 0, output
    assert _requests_in(log) == 1


def test_the_homes_own_log_before_its_runtime_is_a_note_not_an_error(
    home: Path, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh-home"
    env = {"MAYFLY_HOME": str(fresh), "MAYFLY_INVENTORY": str(home / "inventory.json")}
    env |= {"MAYFLY_STORE": str(home / "packages"), "MAYFLY_TRUSTED_KEYS": str(home / "trusted")}
    result = CliRunner(env=env).invoke(cli, ["publish", "reboot", "-d", "sim-0001"])

    assert result.exit_code == 0, result.output
    assert "note: no runtime has opened" in result.output
    assert "until `mayfly up` starts in this home" in result.output
    assert _requests_in(fresh / "events.db") == 1


def test_plan_says_what_a_request_would_do_and_publishes_nothing(
    home: Path, tmp_path: Path
) -> None:
    log = tmp_path / "events.db"
    env = {
        "MAYFLY_HOME": str(home),
        "MAYFLY_INVENTORY": str(home / "inventory.json"),
        "MAYFLY_EVENT_LOG": str(log),
        "MAYFLY_SHARD_SIZE": "2",
    }
    runner = CliRunner(env=env)
    args = ["reboot", "-d", "sim-0001", "-d", "sim-0002", "-d", "sim-0003"]
    table = runner.invoke(cli, ["plan", *args])
    assert table.exit_code == 0, table.output
    assert "devices  3: sim-0001, sim-0002, sim-0003" in table.output
    assert "runs     2 shards of 2, 1 devices" in table.output
    assert "nothing was published; no device was touched" in table.output

    as_json = runner.invoke(cli, ["plan", *args, "-o", "json", "--param", "max_wait_s=5"])
    assert as_json.exit_code == 0, as_json.output
    [plan] = json.loads(as_json.output.split("nothing was published")[0])
    assert (plan["version"], plan["shards"], plan["parallel"]) == ("1.0.0", [2, 1], 2)
    assert plan["digest"].startswith("sha256:")

    counted = runner.invoke(cli, ["plan", "reboot", "-d", "sim-0001", "--count", "3", "-o", "json"])
    assert counted.exit_code == 0, counted.output
    plans = json.loads(counted.output.split("nothing was published")[0])
    assert len({p["request_id"] for p in plans}) == 3  # each its own request, planned once
    assert len({p["digest"] for p in plans}) == 1

    dry = runner.invoke(cli, ["publish", *args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "(not published)" in dry.output
    wrong = runner.invoke(cli, ["plan", "reboot", "-d", "sim-0001", "-p", "colour=red"])
    assert wrong.exit_code == 1
    assert "unknown param 'colour'" in wrong.output
    assert _requests_in(log) == 0
    assert not log.exists()


def test_a_rollback_its_coordinator_would_reject_is_named_before_publishing(
    home: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "rollout.json"
    spec.write_text(
        json.dumps(
            {
                "task": "reboot",
                "devices": ["sim-0001"],
                "rollout": {
                    "abort": {"threshold_pct": 10},
                    "on_abort": {"task": "config-push", "params": {"config": {"colour": 1}}},
                },
            }
        )
    )
    code, output, log = _publish(home, tmp_path, "--file", str(spec))
    assert code == 1, output
    assert "its on_abort rollback (config-push): " in output
    assert "colour" in output
    assert _requests_in(log) == 0
