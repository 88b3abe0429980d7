"""What a careless operator does to the files and settings Mayfly runs on.

A garbage or damaged ``events.db``, ``--event-log`` pointed at another
application's database or at a path that cannot exist, a mistyped store, a
request file with a misspelt key, a result sink that cannot be written. Each
test asserts what the operator sees: one line that names the file or setting
and says what to do, exit status 2, nothing left running, nothing written
into a file that is not Mayfly's, and no result lost once devices acted.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.errors import ConfigError
from mayfly.eventlog.publisher import publish_request
from mayfly.eventlog.sqlite import SCHEMA_VERSION, SqliteEventLog
from mayfly.events import TaskRequest, from_kafka, new_request
from mayfly.runtime.state import RuntimeState
from mayfly.settings import Settings
from mayfly.testing import publish_folders
from mayfly.topics import Topics

from ..conftest import processes_of

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"
#: How long `mayfly up` may take to refuse a file or stop after an error.
STOP_S = 20.0


# -- helpers -------------------------------------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    # os.environ is already clean: tests/conftest.py's isolated_environment.
    return dict(os.environ) | {"MAYFLY_HOME": str(home)} | extra


def _published_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    publish_folders(Settings.from_env(_env(home)), [TASKPKGS / "reboot"])
    return home


def _mayfly(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _gone(home: Path, within_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := processes_of(home)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class _Up:
    """`mayfly up` in a session of its own, so whatever it leaves behind can be found."""

    def __init__(self, home: Path, *args: str, **variables: str) -> None:
        self.home = home
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mayfly.cli", "up", *args],
            env=_env(home, **variables),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.output = b""

    def wait_for(self, text: str, timeout_s: float = STOP_S) -> bool:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while text.encode() not in self.output and time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.output += chunk
        return text.encode() in self.output

    def result(self, timeout_s: float = STOP_S) -> tuple[int | None, str, list[int]]:
        """(exit status or None if it was still running, output, processes left)."""
        try:
            out, _ = self.process.communicate(timeout=timeout_s)
            code: int | None = self.process.returncode
        except subprocess.TimeoutExpired:
            code, out = None, b""
        left = _gone(self.home)
        if code is None or left:
            # Ours to end: the session this test started, by its id.
            os.killpg(self.process.pid, signal.SIGKILL)
            more, _ = self.process.communicate()
            out = (out or b"") + more
        return code, (self.output + (out or b"")).decode(errors="replace"), left


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _fill_log(path: Path, count: int) -> None:
    """A real log with requests on a topic nobody reads, checkpointed into the file."""
    with SqliteEventLog(path) as log:
        for i in range(count):
            request = new_request("reboot", devices=[f"sim-{i:04d}"], priority="low")
            publish_request(log, request, None, topics=Topics("elsewhere"))
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()


def _overwrite_page(path: Path, page: int) -> None:
    size = 4096
    with sqlite3.connect(path) as raw:
        size = raw.execute("PRAGMA page_size").fetchone()[0]
    raw.close()
    with path.open("r+b") as fh:
        fh.seek(size * (page - 1))
        fh.write(b"\xff" * size)


def _records_pages(path: Path) -> tuple[int, int]:
    """(root page, first leaf page in key order) of the records table."""
    raw = sqlite3.connect(path)
    try:
        root = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()
        leaf = raw.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf'"
            " ORDER BY path LIMIT 1"
        ).fetchone()
    finally:
        raw.close()
    return int(root[0]), int(leaf[0])


# -- a garbage or damaged event log ------------------------------------------------


@pytest.mark.parametrize("where", ["events.db", "runtime/state.db"])
def test_up_refuses_a_garbage_file_in_one_line_and_leaves_nothing_running(
    tmp_path: Path, where: str
) -> None:
    home = _published_home(tmp_path)
    garbage = home / where
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(os.urandom(64 * 1024))
    code, output, left = _Up(home).result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    assert _lines(output) == [_lines(output)[0]], output
    assert str(garbage) in output
    assert "not a SQLite database" in output
    assert "Traceback" not in output
    assert left == [], f"left running: {left}"


def test_up_refuses_a_log_with_a_corrupt_page_at_start(tmp_path: Path) -> None:
    home = _published_home(tmp_path)
    log = home / "events.db"
    _fill_log(log, 400)
    # Old requests of another installation ("elsewhere.*" sorts first): no query of
    # the runtime reads that page, only reading the whole file finds it.
    _overwrite_page(log, _records_pages(log)[1])
    code, output, left = _Up(home).result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    [line] = _lines(output)
    assert line.startswith(f"error: sqlite:{log}: corrupt: ")
    assert ".recover" in line, "say what to do"
    assert "move it aside" in line
    assert left == []


def test_up_stops_with_the_message_when_the_log_turns_corrupt_while_running(
    tmp_path: Path,
) -> None:
    home = _published_home(tmp_path)
    log = home / "events.db"
    _fill_log(log, 400)
    up = _Up(home)
    try:
        assert up.wait_for("mayfly up:"), up.output.decode()
        root, _ = _records_pages(log)
        _overwrite_page(log, root)
        # Another process commits: every reader of the file drops its cached pages.
        raw = sqlite3.connect(log, isolation_level=None)
        raw.execute("INSERT INTO commits VALUES ('someone', 'else', 0)")
        raw.close()
    finally:
        code, output, left = up.result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    assert _lines(output)[-1].startswith(f"error: sqlite:{log}: corrupt: "), output
    assert "Traceback" not in output
    assert left == []


# -- an event log pointed at what is not one ---------------------------------------------


def test_an_event_log_pointed_at_another_applications_database_is_refused_untouched(
    tmp_path: Path,
) -> None:
    other = tmp_path / "crm.db"
    raw = sqlite3.connect(other)
    raw.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    raw.execute("INSERT INTO customers (name) VALUES ('ada')")
    raw.commit()
    raw.close()
    before = other.read_bytes()
    run = _mayfly(
        _env(tmp_path / "home"), "publish", "reboot", "-d", "x", "--event-log", str(other)
    )
    assert run.returncode == 2, run.stderr
    [line] = _lines(run.stderr)
    assert str(other) in line
    assert "not a Mayfly event log" in line
    assert "customers" in line
    assert other.read_bytes() == before, "no table added, no switch to WAL"
    assert not Path(f"{other}-wal").exists()


def test_a_log_from_before_the_mark_is_adopted_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute(
        "CREATE TABLE records (topic TEXT NOT NULL, off INTEGER NOT NULL, key BLOB,"
        " value BLOB NOT NULL, headers BLOB NOT NULL, ts_ms INTEGER NOT NULL,"
        " PRIMARY KEY (topic, off)) WITHOUT ROWID"
    )
    raw.execute(
        "CREATE TABLE commits (grp TEXT NOT NULL, topic TEXT NOT NULL,"
        " next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic)) WITHOUT ROWID"
    )
    raw.execute("INSERT INTO records VALUES ('t', 0, NULL, x'6f6c64', x'', 0)")
    raw.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    raw.close()
    with SqliteEventLog(path) as log:
        log.append("t", None, b"new")
        consumer = log.consumer("g", "t")
        assert [r.value for r in consumer.poll(10)] == [b"old", b"new"]
    raw = sqlite3.connect(path)
    marks = raw.execute("PRAGMA application_id").fetchone()[0]
    raw.close()
    assert marks != 0, "a Mayfly file is marked as one"


def test_a_new_log_is_marked_and_a_marked_one_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventLog(path) as log:
        log.append("t", None, b"x")
    raw = sqlite3.connect(path)
    app_id = raw.execute("PRAGMA application_id").fetchone()[0]
    raw.close()
    assert app_id != 0
    with SqliteEventLog(path) as log:
        assert [r.value for r in log.consumer("g", "t").poll(10)] == [b"x"]


def test_the_log_refuses_a_file_marked_by_another_application(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA application_id=1234")
    raw.close()
    with SqliteEventLog(path) as log, pytest.raises(ConfigError, match="not a Mayfly event log"):
        log.append("t", None, b"x")
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    raw.close()


@pytest.mark.parametrize("folder", ["/proc/nope", "a-file"])
def test_publish_to_a_log_whose_folder_cannot_be_made_is_one_line_and_exit_2(
    tmp_path: Path, folder: str
) -> None:
    (tmp_path / "a-file").write_text("in the way")
    target = (Path(folder) if folder.startswith("/") else tmp_path / folder) / "x.db"
    checked = _mayfly(
        _env(tmp_path / "home"), "publish", "reboot", "-d", "x", "--event-log", str(target)
    )
    # Checked, no runtime can have made it: named as such, before anything else.
    assert checked.returncode == 1, checked.stderr
    assert f"no runtime has initialised the event log {target}" in checked.stderr
    run = _mayfly(
        _env(tmp_path / "home"),
        "publish", "reboot", "-d", "x", "--no-validate", "--event-log", str(target),
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    [line] = _lines(run.stderr)
    assert str(target) in line
    assert "cannot create its folder" in line
    assert "MAYFLY_EVENT_LOG" in line


# -- the runtime's state file ------------------------------------------------------------


def test_the_runtime_state_refuses_another_applications_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE notes (text TEXT)")
    raw.commit()
    raw.close()
    before = path.read_bytes()
    state = RuntimeState(path)
    with pytest.raises(ConfigError, match=f"{path}.*not Mayfly's runtime state"):
        state.has_result("r-1")
    state.close()
    assert path.read_bytes() == before


def test_a_corrupt_runtime_state_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(os.urandom(8192))
    state = RuntimeState(path)
    with pytest.raises(ConfigError, match=str(path)):
        state.mark_result("r-1")
    state.close()


def test_a_runtime_state_from_before_the_mark_keeps_its_results(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    raw = sqlite3.connect(path)
    raw.executescript(
        "CREATE TABLE results (request_id TEXT PRIMARY KEY) WITHOUT ROWID;"
        "CREATE TABLE crashes (request_id TEXT PRIMARY KEY, count INTEGER NOT NULL)"
        " WITHOUT ROWID; INSERT INTO results VALUES ('r-done');"
    )
    raw.close()
    state = RuntimeState(path)
    assert state.has_result("r-done")
    assert state.add_crash("r-2") == 1
    state.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] != 0
    raw.close()


# -- a store that is not there --------------------------------------------------------------


def test_up_with_a_mistyped_store_says_so_at_start(tmp_path: Path) -> None:
    home = _published_home(tmp_path)
    typo = tmp_path / "pacakges"
    code, output, left = _Up(home, MAYFLY_STORE=str(typo)).result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    [line] = _lines(output)
    assert "MAYFLY_STORE" in line
    assert str(typo) in line
    assert "no such folder" in line
    assert not (home / "runtime").exists(), "nothing should have started"
    assert left == []


def test_up_with_a_store_folder_holding_no_package_says_so(tmp_path: Path) -> None:
    home = _published_home(tmp_path)
    (tmp_path / "empty").mkdir()
    code, output, _ = _Up(home, MAYFLY_STORE=str(tmp_path / "empty")).result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    [line] = _lines(output)
    assert "MAYFLY_STORE" in line
    assert "no task package" in line


@pytest.mark.parametrize("exists", [False, True])
def test_up_in_a_new_home_says_to_publish_a_package_first(tmp_path: Path, exists: bool) -> None:
    home = tmp_path / "new-home"
    if exists:
        home.mkdir()
    code, output, _ = _Up(home).result()
    assert code == 2, f"still running or wrong status ({code}):\n{output}"
    [line] = _lines(output)
    assert "mayfly pkg publish" in line
    assert ("MAYFLY_HOME" in line) is not exists, "a home that is not there may be a typo"
    assert not (home / "runtime").exists()


def test_pkg_publish_still_creates_a_new_store(tmp_path: Path) -> None:
    env = _env(tmp_path / "home", MAYFLY_STORE=str(tmp_path / "brand-new-store"))
    assert _mayfly(env, "pkg", "keygen").returncode == 0
    run = _mayfly(env, "pkg", "publish", str(TASKPKGS / "reboot"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "brand-new-store" / "reboot").is_dir()


def test_job_mode_with_a_mistyped_store_is_a_config_error_not_unknown_task(
    tmp_path: Path,
) -> None:
    home = _published_home(tmp_path)
    results = tmp_path / "results.jsonl"
    job = subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=_env(
            home,
            MAYFLY_STORE=str(tmp_path / "typo"),
            MAYFLY_RESULT_SINK=str(results),
            TASK_TYPE="reboot",
            DEVICE_IDS="sim-0001",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert job.returncode == 2, job.stderr
    assert "MAYFLY_STORE" in job.stderr
    assert "no such folder" in job.stderr
    assert not results.exists(), "a configuration error rejects nothing"


# -- mayfly publish --file --------------------------------------------------------------


def _published_requests(home: Path) -> list[TaskRequest]:
    found: list[TaskRequest] = []
    with SqliteEventLog(home / "events.db") as log:
        for lane in Topics().lanes():
            for record in log.consumer("test", lane).poll(100):
                event = from_kafka(record.headers, record.key, record.value)
                assert isinstance(event, TaskRequest)
                found.append(event)
    return found


def test_publish_file_carries_rollout_and_deadline(tmp_path: Path) -> None:
    home = tmp_path / "home"
    spec = {
        "task": "reboot",
        "devices": ["sim-0001", "sim-0002"],
        "rollout": {"max_parallel": 1, "max_failure_ratio": 0.5},
        "deadline": "2031-05-01T12:00:00+02:00",
    }
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([spec]))
    # Not checked against a store or inventory: what is under test is the file.
    run = _mayfly(_env(home), "publish", "--no-validate", "--file", str(requests))
    assert run.returncode == 0, run.stderr
    [request] = _published_requests(home)
    assert request.rollout is not None
    assert (request.rollout.max_parallel, request.rollout.max_failure_ratio) == (1, 0.5)
    assert request.deadline == datetime(2031, 5, 1, 10, 0, tzinfo=UTC)


def test_publish_file_refuses_unknown_keys_and_publishes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    requests = tmp_path / "requests.json"
    good = {"task": "reboot", "devices": ["sim-0001"]}
    requests.write_text(json.dumps([good, good | {"deadine": "2031-01-01T00:00:00Z"}]))
    run = _mayfly(_env(home), "publish", "--file", str(requests))
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in _lines(run.stderr) if line.startswith("Error")]
    assert len(errors) == 1, run.stderr
    assert "deadine" in errors[0]
    assert "request 1" in errors[0]
    assert "published" not in run.stdout
    assert not (home / "events.db").exists() or _published_requests(home) == []


def test_publish_file_with_a_bad_deadline_names_the_field(tmp_path: Path) -> None:
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps({"task": "reboot", "devices": ["d"], "deadline": "tomorrow"}))
    run = _mayfly(_env(tmp_path / "home"), "publish", "--file", str(requests))
    assert run.returncode == 2
    assert "deadline" in run.stderr
    assert "Traceback" not in run.stderr


# -- a result sink that cannot be written ------------------------------------------------


def _job(home: Path, sink: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=_env(home, MAYFLY_RESULT_SINK=str(sink), **variables),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_undelivered_result_is_spooled_and_delivered_by_the_next_run(tmp_path: Path) -> None:
    home = _published_home(tmp_path)
    server = SimulatorServer(Simulator(2, reboot_time=0.05)).start()
    try:
        inventory = tmp_path / "inventory.json"
        inventory.write_bytes(server.inventory().to_json())
        (tmp_path / "not-a-folder").write_text("a file where the sink's folder should be")
        broken, good = tmp_path / "not-a-folder" / "results.jsonl", tmp_path / "results.jsonl"
        request = {"MAYFLY_INVENTORY": str(inventory), "TASK_TYPE": "reboot"}

        first = _job(home, broken, **request, TASK_ID="req-1", DEVICE_IDS="sim-0001")
        assert first.returncode == 6, first.stderr
        assert "Traceback" not in first.stderr
        spooled = sorted((home / "spool").glob("*.jsonl"))
        assert len(spooled) == 1, first.stderr
        assert str(spooled[0]) in first.stderr, "say where the result is kept"
        [kept] = [json.loads(line) for line in spooled[0].read_text().splitlines()]
        assert kept["type"] == "dev.mayfly.task.completed"
        assert kept["data"]["request_id"] == "req-1"
        applied = server.simulator.summary()["applied"]

        # The next run, with a working sink, delivers the spooled result before its own.
        second = _job(home, good, **request, TASK_ID="req-2", DEVICE_IDS="sim-0002")
        assert second.returncode == 0, second.stderr
        delivered = [json.loads(line) for line in good.read_text().splitlines()]
        assert [e["data"]["request_id"] for e in delivered] == ["req-1", "req-2"]
        assert delivered[0] == kept
        assert list((home / "spool").glob("*.jsonl")) == []

        # A retry of a request whose spooled result was delivered does not act again.
        good.unlink()
        first_again = _job(home, broken, **request, TASK_ID="req-3", DEVICE_IDS="sim-0001")
        assert first_again.returncode == 6
        before = server.simulator.summary()["applied"]
        retry = _job(home, good, **request, TASK_ID="req-3", DEVICE_IDS="sim-0001")
        assert retry.returncode == 0, retry.stderr
        assert server.simulator.summary()["applied"] == before, "the devices acted once"
        assert [
            json.loads(line)["data"]["request_id"] for line in good.read_text().splitlines()
        ] == ["req-3"]
        assert applied >= 1
    finally:
        server.stop()


def test_up_with_an_unreadable_trusted_key_gives_its_hint(tmp_path: Path) -> None:
    # Met in the warm parent, said by `mayfly up` as if met there: with its hint.
    home = _published_home(tmp_path)
    missing = tmp_path / "nowhere.pub"
    code, output, left = _Up(home, MAYFLY_TRUSTED_KEYS=str(missing)).result()
    assert code == 1, f"still running or wrong status ({code}):\n{output}"
    lines = _lines(output)
    assert str(missing) in lines[0], lines
    assert lines[1:] == [f"hint: {_HINT_KEYS}"], lines
    assert left == []


_HINT_KEYS = "create a key with `mayfly pkg keygen` or point MAYFLY_SIGNING_KEY/--key at one."
