"""``mayfly publish --wait``: the outcome printed, and job mode's exit code.

A real ``mayfly up`` on the SQLite log and on real Kafka, a simulated fleet,
and ``mayfly publish`` as a user runs it, in its own process.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mayfly.app.waiting import wait_for_outcomes
from mayfly.errors import PackageNotFoundError
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import (
    TaskCompleted,
    TaskRejected,
    new_request,
    rejection_for,
    shard_request,
    split_completed,
    to_kafka_record,
)
from mayfly.exitcodes import ExitCode
from mayfly.topics import Topics
from tests.aggregator.conftest import device, result
from tests.runtime.conftest import Home


@pytest.fixture(params=["sqlite", "kafka"])
def log_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    prefix = f"w{uuid.uuid4().hex[:8]}"
    return {"MAYFLY_EVENT_LOG": f"kafka://{bootstrap}", "MAYFLY_TOPIC_PREFIX": prefix}


def _publish(home: Home, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", "publish", "--wait", *args],
        env=home.env(**env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_wait_prints_each_outcome_and_exits_with_the_worst(
    home: Home, fleet, log_env: dict[str, str]
) -> None:
    fleet(3, broken=["sim-0002"])
    home.up_with(output=home.root.parent / "up.log", **log_env)

    ok = _publish(home, log_env, "reboot", "-d", "sim-0001", "--timeout", "120")
    partial = _publish(home, log_env, "reboot", "-d", "sim-0001", "-d", "sim-0002")
    # --no-validate: the runtime's rejection is what is under test.
    rejected = _publish(
        home, log_env, "config-push", "-d", "sim-0003", "-p", "config=7", "--no-validate"
    )

    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "reboot 1.0.0: succeeded (1 succeeded)" in ok.stdout
    assert partial.returncode == 3, partial.stdout + partial.stderr
    assert "partial (1 failed, 1 succeeded)" in partial.stdout
    assert rejected.returncode == 5, rejected.stdout + rejected.stderr
    assert "rejected (invalid_params)" in rejected.stdout


def test_wait_without_a_runtime_gives_up_at_its_timeout(home: Home, fleet) -> None:
    fleet(1)

    run = _publish(home, {}, "reboot", "-d", "sim-0001", "--timeout", "1")

    assert run.returncode == 1
    assert "no outcome within 1 s for 1 of 1 request(s)" in run.stderr


# -- the outcomes read back, on the log alone ----------------------------------


def _append(log: SqliteEventLog, *events: TaskCompleted | TaskRejected) -> None:
    for event in events:
        log.append(Topics().results, *to_kafka_record(event))


def test_a_rejected_shard_of_a_long_id_is_its_requests_outcome(tmp_path: Path) -> None:
    # 250 characters: its shards' ids are shortened to a hash, not "<id>#shard-N".
    request = new_request("reboot", devices=["a", "b"], request_id="r" * 250)
    shards = shard_request(request, ["a", "b"], 1, version="1.0.0")
    assert not shards[1].id.startswith(request.id)
    refused = rejection_for(
        PackageNotFoundError("no such package", package="reboot"),
        {"id": shards[1].id, "tasktype": "reboot", "time": request.time.isoformat()},
    )
    with SqliteEventLog(tmp_path / "events.db") as log:
        _append(log, refused)
        waited = wait_for_outcomes(log, Topics(), [request.id, "other"], timeout_s=1)

    assert list(waited.outcomes) == [request.id]
    assert waited.missing == ["other"]
    assert waited.exit_code is ExitCode.REJECTED


def test_a_result_in_parts_counts_once_however_often_a_part_comes(tmp_path: Path) -> None:
    whole = result("r1", devices=[device(f"sim-{i:04d}") for i in range(400)])
    parts = split_completed(whole, max_event_bytes=20_000)
    assert len(parts) > 2
    told: list[object] = []
    with SqliteEventLog(tmp_path / "events.db") as log:
        _append(log, *parts[:-1], parts[0], parts[-1])
        waited = wait_for_outcomes(log, Topics(), ["r1"], timeout_s=5, on_outcome=told.append)

    assert len(told) == 1
    merged = waited.outcomes["r1"]
    assert isinstance(merged, TaskCompleted)
    assert len(merged.devices) == 400
    assert waited.exit_code is ExitCode.OK
