"""An idle runtime on the SQLite log sleeps until something is written.

Without a wake-up from the kernel, a waiting reader asked the file every few
milliseconds: the dispatcher 300 polls a second over its three lanes, and a
waiting ``poll`` 200 ``data_version`` queries a second. These tests count
those reads while nothing happens, and check that an append still wakes the
reader at once.
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mayfly.eventlog.sqlite as sqlite_log
from mayfly.app.local import Runtime
from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog.publisher import publish_request
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import new_request

from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]

_APPEND = (
    "import sys; from pathlib import Path; from mayfly.eventlog.sqlite import SqliteEventLog; "
    "log = SqliteEventLog(Path(sys.argv[1])); log.append('t', None, b'from another process'); "
    "log.close()"
)


def _readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteEventLog]:
    with SqliteEventLog(tmp_path / "events.db") as opened:
        opened.append("t", None, b"first")  # the file and its WAL exist
        yield opened


def test_the_waker_wakes_on_another_process_s_append_and_only_then(
    log: SqliteEventLog, tmp_path: Path
) -> None:
    waker = log.waker()
    assert waker is not None
    try:
        waker.drain()
        assert not _readable(waker.fileno(), 0.0)
        (tmp_path / "notes.txt").write_text("a neighbour in the same folder")
        assert not waker.drain(), "a write to another file counted as the log's"
        subprocess.run([sys.executable, "-c", _APPEND, str(tmp_path / "events.db")], check=True)
        assert _readable(waker.fileno(), 10.0)
        assert waker.drain()
        assert not _readable(waker.fileno(), 0.0)
    finally:
        waker.close()


def test_a_waiting_poll_sleeps_until_the_append(
    log: SqliteEventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = log.consumer("g", "t")
    assert [r.value for r in consumer.poll(10)] == [b"first"]
    asked = Counter[str]()
    real = sqlite_log._data_version

    def counted(conn: Any) -> int:
        asked["data_version"] += 1
        return real(conn)

    monkeypatch.setattr(sqlite_log, "_data_version", counted)
    assert consumer.poll(10, timeout_s=1.0) == []  # a second of nothing to read
    idle = asked["data_version"]
    later = threading.Timer(
        0.3,
        lambda: subprocess.run(
            [sys.executable, "-c", _APPEND, str(tmp_path / "events.db")], check=True
        ),
    )
    later.start()
    try:
        records = consumer.poll(10, timeout_s=30.0)
    finally:
        later.join()
    assert [r.value for r in records] == [b"from another process"]
    assert idle <= 5, f"{idle} reads of the file in one idle second"


def test_an_idle_dispatcher_sleeps_and_an_append_wakes_it(
    home: Home, fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(1)
    polls = Counter[str]()
    real_poll = sqlite_log._SqliteConsumer.poll

    def counted(self: Any, max_records: int = 100, timeout_s: float = 0.0) -> Any:
        polls[self._topic] += 1
        return real_poll(self, max_records, timeout_s)

    monkeypatch.setattr(sqlite_log._SqliteConsumer, "poll", counted)
    finished = threading.Event()
    runtime = Runtime(
        home.settings(),
        on_dispatch=lambda kind, _info: finished.set() if kind == "finished" else None,
    )
    runtime.start()
    stop_at = time.monotonic() + 60
    serving = threading.Thread(
        target=runtime.run,
        kwargs={"should_stop": lambda: finished.is_set() or time.monotonic() > stop_at},
    )
    serving.start()
    try:
        time.sleep(1.0)
        idle = sum(polls.values())
        request = new_request("reboot", devices=["sim-0001"])
        with home.log() as publisher:
            publish_request(publisher, request, None, home.settings().topics)
        assert finished.wait(30), "the published request never finished"
    finally:
        runtime.stop()
        serving.join(timeout=30)
        runtime.close()
    # Three lanes, a round at most every 0.25 s when idle; 10 ms rounds made 300.
    assert idle <= 3 * 8, f"{idle} lane polls in one idle second"
