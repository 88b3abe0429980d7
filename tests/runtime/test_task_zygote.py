"""Task processes of the local runtime come from the task zygote: they hold
nothing of their coordinator, and none outlives it."""

from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mayfly.app.local import Runtime
from mayfly.app.publishing import publish_folder
from mayfly.coordinator import zygote as zygote_module
from mayfly.coordinator.worker import CancelFlag, WorkerSpec
from mayfly.coordinator.zygote import TaskZygote
from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, TaskRejected, TaskRequest, new_request

from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]

#: Modules of the coordinator's own work: a task process has no use for them.
_COORDINATOR_MODULES = (
    "mayfly.app", "mayfly.runtime", "mayfly.eventlog", "mayfly.events", "mayfly.packages",
    "minio", "kafka", "pydantic", "jsonschema", "cryptography",
)  # fmt: skip

_SNOOP = f"""
import gc, os, sys

def run(ctx):
    strings = []
    for obj in gc.get_objects():
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
        strings += [v for v in values if isinstance(v, str) and "remnant-" in v]
    return {{
        "ppid": os.getppid(),
        "modules": sorted(m for m in sys.modules if m.startswith({_COORDINATOR_MODULES!r})),
        "remnants": sorted(set(strings)),
        "params": ctx.params,
    }}
"""


def _run_one(home: Home, request: TaskRequest) -> TaskCompleted | TaskRejected:
    """``request`` run by a real ``mayfly up`` of ``home`` (a minute at most); its outcome."""
    log = home.log()
    publish_request(log, request)
    log.close()
    runtime = Runtime(home.settings())
    runtime.start()
    deadline = time.monotonic() + 60
    try:
        runtime.run(should_stop=lambda: bool(home.results()) or time.monotonic() > deadline)
    finally:
        runtime.close()
    return home.results()[request.id]


def _snoop_package(home: Home, tmp_path: Path) -> None:
    folder = tmp_path / "snoop"
    folder.mkdir()
    manifest = {
        "name": "snoop",
        "version": "1.0.0",
        "entrypoint": "snoop:run",
        "params_schema": {"type": "object", "properties": {"note": {"type": "string"}}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "snoop.py").write_text(_SNOOP)
    publish_folder(home.settings(), folder)


def test_package_code_sees_nothing_of_its_coordinator_or_the_requests_before(
    home: Home, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(1)
    _snoop_package(home, tmp_path)
    requests = [
        new_request("snoop", devices=["sim-0001"], params={"note": f"remnant-{i}"})
        for i in range(4)
    ]
    log = home.log()
    for request in requests:
        publish_request(log, request)
    log.close()
    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS="1"))  # one coordinator serves all
    runtime.start()
    deadline = time.monotonic() + 60
    try:
        runtime.run(
            should_stop=lambda: len(home.results()) == len(requests) or time.monotonic() > deadline
        )
    finally:
        runtime.close()

    results = home.results()
    assert set(results) == {r.id for r in requests}
    for i, request in enumerate(requests):
        result = results[request.id]
        assert isinstance(result, TaskCompleted), result
        assert result.status == "succeeded", result
        [device] = result.devices
        # Its parent is the zygote, not the coordinator that made this result.
        assert device.output["ppid"] != result.coordinator.pid
        assert device.output["modules"] == []
        # Its own params only: nothing of what the same coordinator ran before.
        assert device.output["remnants"] in ([], [f"remnant-{i}"])


@pytest.fixture
def zygote() -> Iterator[TaskZygote]:
    z = TaskZygote()
    z.start()
    yield z
    z.stop()


def _spec(package: Path, scratch: Path) -> WorkerSpec:
    return WorkerSpec(
        request_id="r1",
        package_dir=package,
        entrypoint="task:run",
        memory_mb=256,
        params={},
        cpu_seconds=30,
        cancel=CancelFlag(),
        scratch_root=scratch,
    )


def _package(tmp_path: Path) -> Path:
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "task.py").write_text("def run(ctx):\n    return 'ok'\n")
    return folder


def _gone(pid: int, timeout_s: float) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def test_a_task_process_whose_coordinator_is_gone_is_killed(
    zygote: TaskZygote, tmp_path: Path
) -> None:
    ours, theirs = socket.socketpair()
    task = zygote.start_task(theirs.fileno(), _spec(_package(tmp_path), tmp_path))
    theirs.close()
    pid = task.pid
    assert pid is not None
    ours.settimeout(10)
    assert b"ready" in ours.recv(100)  # waiting for its first device now
    # The coordinator ends without a word; its channel stays open somewhere.
    task._status.close()  # what its exit does to the status socket
    assert _gone(pid, 10), "the task process outlived its coordinator"
    ours.close()


def test_the_zygote_ignores_a_malformed_request_and_serves_the_next(
    zygote: TaskZygote, tmp_path: Path
) -> None:
    assert zygote._sock is not None
    zygote._sock.send(b"spawn")  # no descriptors
    zygote._sock.send(b"fork bomb please")
    ours, theirs = socket.socketpair()
    task = zygote.start_task(theirs.fileno(), _spec(_package(tmp_path), tmp_path))
    theirs.close()
    ours.settimeout(10)
    assert b"ready" in ours.recv(100)
    ours.close()  # it reads EOF and exits
    task.join(10)
    assert task.exitcode == 0


def test_the_zygote_holds_no_secret_of_the_process_that_started_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAYFLY_S3_SECRET_KEY", "zygote-secret-value")
    zygote = TaskZygote()
    zygote.start()
    try:
        assert zygote.pid is not None
        environ = Path(f"/proc/{zygote.pid}/environ").read_bytes()
        assert b"zygote-secret-value" not in environ
        assert b"MAYFLY_S3_SECRET_KEY" not in environ
    finally:
        zygote.stop()


def test_a_coordinator_whose_zygote_died_still_runs_its_devices(
    home: Home, fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    from mayfly.app.wiring import build_coordinator

    fleet(2)
    zygote = TaskZygote()
    zygote.start()
    assert zygote._process is not None
    zygote._process.kill()
    zygote._process.wait()
    coordinator = build_coordinator(home.settings(), "test", starter=zygote)
    try:
        outcome = coordinator.handle(new_request("reboot", devices=["sim-0001", "sim-0002"]))
    finally:
        zygote.stop()
    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.status == "succeeded", outcome
    assert "forking task processes here" in caplog.text


def test_the_folder_mayfly_up_was_started_in_is_out_of_reach(
    home: Home, fleet: FleetFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator starts `mayfly up` in a folder of their own (a home, a project
    # with keys in it): no package may read it, nor import from it.
    started_in = tmp_path / "operator"
    started_in.mkdir()
    (started_in / "secret.txt").write_text("operator-secret")
    monkeypatch.chdir(started_in)
    fleet(1)
    folder = tmp_path / "reader"
    folder.mkdir()
    manifest = {"name": "reader", "version": "1.0.0", "entrypoint": "reader:run"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "reader.py").write_text(
        "def run(ctx):\n"
        "    try:\n"
        f"        return open({str(started_in / 'secret.txt')!r}).read()\n"
        "    except OSError as exc:\n"
        "        return type(exc).__name__\n"
    )
    publish_folder(home.settings(), folder)
    request = new_request("reader", devices=["sim-0001"])
    result = _run_one(home, request)
    assert isinstance(result, TaskCompleted), result
    [device] = result.devices
    assert device.output == "PermissionError", device


def test_a_wedged_zygote_is_given_up_on_in_a_bounded_time(
    zygote: TaskZygote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zygote_module, "_WORD_WAIT_S", 0.5)
    ours, theirs = socket.socketpair()
    task = zygote.start_task(theirs.fileno(), _spec(_package(tmp_path), tmp_path))
    theirs.close()
    assert task.pid is not None
    assert zygote.pid is not None
    os.kill(zygote.pid, signal.SIGSTOP)  # it will say nothing more
    try:
        task.kill()
        ended = threading.Thread(target=task.poll, kwargs={"block": True}, daemon=True)
        ended.start()
        ended.join(10)
        assert not ended.is_alive(), "the coordinator waited on the zygote for ever"
    finally:
        os.kill(zygote.pid, signal.SIGCONT)
    assert task.exitcode == -signal.SIGKILL
    assert task.failure is not None
    assert "did not answer" in task.failure
    ours.close()


def test_a_zygote_that_keeps_dying_is_not_restarted_for_every_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    zygote = TaskZygote()
    zygote.start()
    try:
        for expected in (True, False):  # the second death falls within the backoff
            assert zygote._process is not None
            zygote._process.kill()
            zygote._process.wait()
            assert zygote.restart_if_dead() is expected
        assert caplog.text.count("starting it again") == 1
    finally:
        zygote.stop()


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def test_a_task_process_started_for_a_rejected_request_is_ended_with_its_folder(
    home: Home, fleet: FleetFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The warm parent asks for a request's first task process before the params
    # are checked; bad params end it unused, and leave no scratch folder.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fleet(1)
    _snoop_package(home, tmp_path)
    bad = new_request("snoop", devices=["sim-0001"], params={"note": 5})
    good = new_request("snoop", devices=["sim-0001"], params={"note": "remnant-ok"})
    log = home.log()
    publish_request(log, bad)
    publish_request(log, good)
    log.close()
    runtime = Runtime(home.settings(MAYFLY_COORDINATOR_MODE="strict"))
    runtime.start()
    deadline = time.monotonic() + 60
    try:
        runtime.run(should_stop=lambda: len(home.results()) == 2 or time.monotonic() > deadline)
        warm = runtime.spawner.pid
        assert warm is not None
        time.sleep(0.5)  # the coordinators' exits
        [zygote] = _children_of(warm)
        assert _children_of(zygote) == [], "a task process outlived its request"
        assert list(scratch.glob("mayfly-scratch-*")) == []
    finally:
        runtime.close()
    results = home.results()
    assert isinstance(results[bad.id], TaskRejected), results[bad.id]
    done = results[good.id]
    assert isinstance(done, TaskCompleted), done
    [device] = done.devices
    assert device.output["params"] == {"note": "remnant-ok"}  # read at its first run


def test_an_exit_and_its_hang_up_in_one_select_touch_nothing_of_the_reaped_child() -> None:
    # A task process ends and its coordinator hangs up at once: one select()
    # reports both. After the reap its pid and pidfd are no longer its own.
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    pidfd = os.pidfd_open(pid)
    coordinator, status = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = zygote_module._Child(pid, pidfd, status)
    selector = selectors.DefaultSelector()
    selector.register(pidfd, selectors.EVENT_READ, ("exit", child))
    selector.register(status, selectors.EVENT_READ, ("peer", child))
    coordinator.close()
    select.select([pidfd], [], [], 10)
    zygote_module._reap(child, {pidfd: child}, selector)
    zygote_module._from_coordinator(child, selector)  # was: EBADF, and the zygote died
    selector.close()


def test_a_package_with_dependencies_runs_from_the_zygote(
    home: Home, fleet: FleetFactory, tmp_path: Path, package_index: None
) -> None:
    """Its task processes come from the zygote, whose sys.modules is the
    task side's: the package's own copy of a library is what it imports."""
    fleet(2)
    folder = tmp_path / "deps"
    folder.mkdir()
    manifest = {
        "name": "deps",
        "version": "1.0.0",
        "entrypoint": "task:run",
        "dependencies": ["humanize==4.9.0"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "task.py").write_text(
        "import humanize\n\ndef run(ctx):\n"
        "    return {'v': humanize.__version__, 'at': humanize.__file__}\n"
    )
    publish_folder(home.settings(), folder)
    request = new_request("deps", devices=["sim-0001", "sim-0002"])
    result = _run_one(home, request)
    assert isinstance(result, TaskCompleted), result
    assert result.status == "succeeded", result
    for device in result.devices:
        assert device.output["v"] == "4.9.0"
        assert "/_deps/humanize/" in device.output["at"]
