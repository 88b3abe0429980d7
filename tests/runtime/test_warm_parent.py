"""The warm parent readies each request's package before it forks the coordinator."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mayfly.app.warm import WarmCoordinator
from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog import LogRecord
from mayfly.events import (
    TASK_PROGRESS,
    TaskCompleted,
    TaskRejected,
    from_kafka,
    new_request,
    to_kafka_record,
)
from mayfly.packages import LocalPackageStore
from mayfly.runtime.session import answer_blocking
from mayfly.runtime.spawner import Spawner
from mayfly.testing import publish_folder
from mayfly.topics import Topics

from .conftest import TASKPKGS, Home

FleetFactory = Callable[..., SimulatorServer]


class ReadsLog(LocalPackageStore):
    """A local store that appends ``pid key`` to a file for every key read, in
    whichever process reads it."""

    def __init__(self, root: Path, log: Path) -> None:
        super().__init__(root)
        self.log = log

    def get(self, key: str) -> bytes | None:
        with self.log.open("a") as fh:
            fh.write(f"{os.getpid()} {key}\n")
        return super().get(key)

    def taken(self) -> list[tuple[int, str]]:
        """The reads so far, and forget them."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.unlink(missing_ok=True)
        return [(int(pid), key) for pid, key in (line.split(" ", 1) for line in lines)]


class Runs:
    """A warm parent over a store that logs its reads, and the results it sends."""

    def __init__(self, home: Home, tmp_path: Path) -> None:
        self.settings = home.settings()
        self.store = ReadsLog(Path(self.settings.store), tmp_path / "reads.log")
        self.spawner = Spawner(self._prepare)
        self.spawner.start()
        self.log = home.log()
        self.consumer = self.log.consumer("test", Topics().results)
        self.count = 0

    def _prepare(self) -> WarmCoordinator:
        warm = WarmCoordinator(self.settings)
        warm.coordinator.repository.store = self.store  # the one the warm parent uses
        return warm

    def run(self, task: str, **fields: str) -> tuple[TaskCompleted | TaskRejected, int]:
        """One request through a forked coordinator: its outcome and the child's pid."""
        key, value, headers = to_kafka_record(new_request(task, devices=["sim-0001"], **fields))
        self.count += 1
        record = LogRecord("test", 0, self.count, key, value, tuple(headers))
        session = self.spawner.spawn(str(self.count), record, datetime.now(UTC))
        answer_blocking(session, self.log)
        session.close()
        exits = []
        while not exits:
            exits = self.spawner.exits(30.0)
        records = self.consumer.poll(10, 10.0)
        # A run that lasts reports its progress first: the outcome is the one record left.
        outcomes = [r for r in records if dict(r.headers).get("ce_type") != TASK_PROGRESS.encode()]
        assert len(outcomes) == 1
        outcome = from_kafka(outcomes[0].headers, outcomes[0].key, outcomes[0].value)
        assert isinstance(outcome, TaskCompleted | TaskRejected)
        return outcome, exits[0].pid

    def close(self) -> None:
        self.spawner.stop()
        self.consumer.close()
        self.log.close()


@pytest.fixture
def runs(home: Home, fleet: FleetFactory, tmp_path: Path) -> Iterator[Runs]:
    fleet(1)
    r = Runs(home, tmp_path)
    yield r
    r.close()


def test_a_coordinator_forked_after_the_warm_up_reads_nothing(runs: Runs) -> None:
    parent = runs.spawner.pid
    first, _ = runs.run("reboot")
    assert isinstance(first, TaskCompleted), first
    reads = runs.store.taken()
    assert (parent, "reboot/1.0.0/package.tar.gz") in reads  # the first pays, in the parent
    for _ in range(2):
        again, child = runs.run("reboot")
        assert isinstance(again, TaskCompleted), again
        assert again.package == first.package
        # The channel, read once, by the warm parent just before the fork; the
        # coordinator took that resolve and the verified package with it.
        assert runs.store.taken() == [(parent, "reboot/channels/stable")]
        assert child != parent


def test_a_moved_channel_reaches_the_next_coordinator(
    runs: Runs, home: Home, tmp_path: Path
) -> None:
    assert runs.run("reboot")[0].package.version == "1.0.0"  # type: ignore[union-attr]
    newer = tmp_path / "reboot"
    shutil.copytree(TASKPKGS / "reboot", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps(manifest | {"version": "1.1.0"}))
    publish_folder(home.settings(), newer)
    moved, _ = runs.run("reboot")
    assert isinstance(moved, TaskCompleted), moved
    assert moved.package.version == "1.1.0"
    pinned, _ = runs.run("reboot", version="1.0.0")
    assert isinstance(pinned, TaskCompleted), pinned
    assert pinned.package.version == "1.0.0"


def test_what_the_warm_up_cannot_do_the_coordinator_rejects_with_the_reason(runs: Runs) -> None:
    unknown, _ = runs.run("teleport")
    assert isinstance(unknown, TaskRejected)
    assert unknown.code == "unknown_task"
    assert "teleport" in unknown.reason
    bad_params, _ = runs.run("reboot", params={"max_wait_s": 0})  # type: ignore[arg-type]
    assert isinstance(bad_params, TaskRejected)
    assert bad_params.code == "invalid_params"
    assert bad_params.field == "params.max_wait_s"


def test_the_warm_parent_never_checks_a_request_s_params_itself(
    home: Home, fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Params are the publisher's, the schema is the package's: a value made to
    # backtrack against a pattern would stall the one process every fork waits
    # for. The warm-up builds the validator on empty params; the coordinator
    # checks the request's.
    fleet(1)
    import mayfly.app.warm as local

    checked: list[dict[str, object]] = []
    real = local.validate_params

    def spy(manifest: object, params: dict[str, object]) -> None:
        checked.append(dict(params))
        real(manifest, params)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "validate_params", spy)
    request = new_request("reboot", devices=["sim-0001"], params={"max_wait_s": 0})
    key, value, headers = to_kafka_record(request)
    with contextlib.closing(WarmCoordinator(home.settings())) as warm:
        warm.before_fork(LogRecord("test", 0, 1, key, value, tuple(headers)))
    assert checked == [{}]
