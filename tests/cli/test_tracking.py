"""``mayfly get`` and ``list`` on what a hostile package or a careless flag brings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import to_kafka_record
from mayfly.topics import Topics
from tests.aggregator.conftest import device, result


def _mayfly(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _logged(home: Path) -> str:
    hostile = "\x1b]0;owned\x07\x1b[2Jgone\nfake row"
    outcome = result("r1", devices=[device("sim-0001", "failed", error=hostile)])
    with SqliteEventLog(home / "events.db") as log:
        log.append(Topics().results, *to_kafka_record(outcome))
    return "r1"


def test_what_a_package_wrote_cannot_steer_the_terminal(tmp_path: Path) -> None:
    request_id = _logged(tmp_path)

    table = _mayfly(tmp_path, "get", request_id)

    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout
    assert "\x07" not in table.stdout
    [row] = [ln for ln in table.stdout.splitlines() if ln.startswith("sim-0001")]
    assert "\\x1b[2Jgone fake row" in row


def test_since_longer_ago_than_a_date_can_be_lists_everything(tmp_path: Path) -> None:
    _logged(tmp_path)

    run = _mayfly(tmp_path, "list", "--since", "99999999999d")

    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1].startswith("r1 ")
    wrong = _mayfly(tmp_path, "list", "--since", "yesterday")
    assert wrong.returncode == 2
    assert "expected a duration" in wrong.stderr
