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


def test_cancel_refuses_a_bad_grace_reason_or_id_before_touching_the_log(tmp_path: Path) -> None:
    for args, said in [
        (["--grace", "soon"], "is not a duration such as 30s"),
        (["--grace", "61m"], "over the 3600 s a grace may last"),
        (["--reason", "x" * 201], "at most 200 characters"),
    ]:
        run = _mayfly(tmp_path, "cancel", "r1", *args)
        assert run.returncode == 2, run.stdout + run.stderr
        assert said in run.stderr
    bad_id = _mayfly(tmp_path, "cancel", "r 1")
    assert bad_id.returncode == 2
    assert "visible ASCII" in bad_id.stderr
    assert not (tmp_path / "events.db").exists()


def test_cancel_of_a_finished_request_says_so_and_changes_nothing(tmp_path: Path) -> None:
    request_id = _logged(tmp_path)

    run = _mayfly(tmp_path, "cancel", request_id)

    assert run.returncode == 1
    assert f"{request_id} already ended (failed): nothing to cancel" in run.stderr
    with SqliteEventLog(tmp_path / "events.db") as log:
        consumer = log.consumer("check", Topics().control)
        assert consumer.poll(10, 0.0) == []


def test_get_shows_a_running_paced_rollouts_pace_and_wave(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from mayfly.events import DeviceStatus, TaskProgress, new_request

    request = new_request(
        "reboot",
        devices=[f"d{i}" for i in range(10)],
        rollout={
            "ramp": {"base_per_minute": 60, "increase_after": 2, "max_per_minute": 600},
            "waves": [2, 3],
        },
    )
    progress = TaskProgress(
        request_id=request.id,
        task="reboot",
        coordinator="c-1",
        seq=0,
        started_at=datetime.now(UTC),
        devices_total=10,
        counts={DeviceStatus.SUCCEEDED: 4, DeviceStatus.RUNNING: 1, DeviceStatus.QUEUED: 5},
    )
    topics = Topics()
    with SqliteEventLog(tmp_path / "events.db") as log:
        log.append(topics.lane(request.priority), *to_kafka_record(request))
        log.append(topics.results, *to_kafka_record(progress))

    shown = _mayfly(tmp_path, "get", request.id)

    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if line.startswith("rollout"))
    # 4 succeeded: two steps of the ramp (60 -> 120 -> 240); 4 ended: the second wave.
    assert "from 60/min, x2 every 2 successes, up to 600" in row
    assert "now 240/min" in row
    assert "wave 2 of 3" in row
    assert "4 of 10 devices ended" in row
