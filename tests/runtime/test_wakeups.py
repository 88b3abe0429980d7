"""An idle runtime on the SQLite log sleeps until something is written.

Without a wake-up from the kernel, a waiting reader asked the file every few
milliseconds: the dispatcher 300 polls a second over its three lanes, and a
waiting ``poll`` 200 ``data_version`` queries a second. These tests count
those reads while nothing happens, and check that an append still wakes the
reader at once.

Kafka has no waker: there the dispatcher polled its three lanes' consumers with
no wait every 10 ms, about 300 polls and 17 % of a core a second. It now reads
the lanes with one consumer and, while nothing runs, waits in its poll (a fetch
the broker holds until a record comes); the Kafka tests count those polls and
check that a request still starts at once, and a crashed one on time.
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import kafka
import pytest

import mayfly.eventlog.sqlite as sqlite_log
from mayfly.app.local import Runtime
from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.eventlog.publisher import publish_request
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import Priority, new_request
from mayfly.runtime.dispatcher import Dispatcher, DispatcherOptions
from mayfly.runtime.session import CoordinatorSession
from mayfly.runtime.spawner import CoordinatorExit
from mayfly.runtime.state import RuntimeState

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


# --- Kafka: no waker; the dispatcher waits in the broker's fetch ----------------------


@pytest.fixture
def kafka_home(home: Home, kafka_bootstrap: str) -> dict[str, str]:
    """Settings of ``home`` on the real Kafka, under topics of its own."""
    return {
        "MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}",
        "MAYFLY_TOPIC_PREFIX": f"mayfly-test-{uuid.uuid4().hex[:8]}",
    }


def _serve(runtime: Runtime, stop: threading.Event) -> threading.Thread:
    stop_at = time.monotonic() + 60
    serving = threading.Thread(
        target=runtime.run,
        kwargs={"should_stop": lambda: stop.is_set() or time.monotonic() > stop_at},
    )
    serving.start()
    return serving


@pytest.mark.kafka
def test_an_idle_dispatcher_on_kafka_waits_in_the_broker(
    home: Home, kafka_home: dict[str, str], fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(1)
    polls: list[float] = []
    real_poll = kafka.KafkaConsumer.poll
    serving: threading.Thread | None = None

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is serving:
            polls.append(time.monotonic())
        return real_poll(self, *args, **kwargs)

    monkeypatch.setattr(kafka.KafkaConsumer, "poll", counted)
    finished, stop = threading.Event(), threading.Event()
    settings = home.settings(**kafka_home)
    others = set(threading.enumerate())
    runtime = Runtime(
        settings, on_dispatch=lambda kind, _info: finished.set() if kind == "finished" else None
    )
    serving = _serve(runtime, stop)
    try:
        time.sleep(0.5)  # past the first rounds
        # The runtime's threads only (its loop, its consumer's): the simulator
        # and what earlier tests left running are not the dispatcher's cost.
        theirs = [t for t in threading.enumerate() if t not in others]
        # The quietest of three seconds for the CPU: one may still hold the
        # consumers' group joins, or a heartbeat and a metadata refresh at once.
        seconds = []
        for _ in range(3):
            before, cpu_before = len(polls), _cpu_s(theirs)
            time.sleep(1.0)
            seconds.append((_cpu_s(theirs) - cpu_before, len(polls) - before))
        cpu, idle = min(c for c, _ in seconds), max(n for _, n in seconds)
        with KafkaEventLog(kafka_home["MAYFLY_EVENT_LOG"].removeprefix("kafka://")) as publisher:
            request = new_request("reboot", devices=["sim-0001"])
            publish_request(publisher, request, None, settings.topics)
        assert finished.wait(30), "the published request never finished"
    finally:
        stop.set()
        runtime.stop()
        serving.join(timeout=30)
        runtime.close()
    # A wait of 0.25 s in the poll makes 4 a second; poll(0) every 10 ms made ~300.
    assert idle <= 8, f"{idle} polls of the broker in one idle second ({seconds})"
    assert cpu < 0.05, f"{cpu:.3f} s of the runtime's CPU in its quietest second ({seconds})"


def _cpu_s(threads: list[threading.Thread]) -> float:
    """The CPU time ``threads`` used so far (those still alive), in seconds."""
    total = 0.0
    for thread in threads:
        if thread.ident is None or not thread.is_alive():
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, ProcessLookupError):
            continue  # ended between the look and the read
    return total


@pytest.mark.kafka
def test_a_request_to_an_idle_dispatcher_on_kafka_starts_at_once(
    home: Home, kafka_home: dict[str, str], fleet: FleetFactory
) -> None:
    fleet(1)
    started_at: list[float] = []
    finished, stop = threading.Event(), threading.Event()

    def on_dispatch(kind: str, _info: dict[str, object]) -> None:
        if kind == "started":
            started_at.append(time.monotonic())
        elif kind == "finished":
            finished.set()

    settings = home.settings(**kafka_home)
    runtime = Runtime(settings, on_dispatch=on_dispatch)
    runtime.start()
    assert runtime.dispatcher is not None
    # A wait in the poll far longer than the start may take: only the record ends it.
    runtime.dispatcher.options = dataclasses.replace(runtime.dispatcher.options, idle_poll_s=1.0)
    serving = _serve(runtime, stop)
    latencies: list[float] = []
    try:
        with KafkaEventLog(kafka_home["MAYFLY_EVENT_LOG"].removeprefix("kafka://")) as publisher:
            for _ in range(3):
                time.sleep(1.5)  # idle: the dispatcher is waiting in the poll
                finished.clear()
                request = new_request("reboot", devices=["sim-0001"])
                publish_request(publisher, request, None, settings.topics)
                published = time.monotonic()  # acknowledged: the fetch can see it
                assert finished.wait(30), "the published request never finished"
                latencies.append(started_at[-1] - published)
    finally:
        stop.set()
        runtime.stop()
        serving.join(timeout=30)
        runtime.close()
    assert max(latencies) < 0.15, f"started {[round(x * 1000) for x in latencies]} ms after"


class _NoWakerLog(SqliteEventLog):
    """The SQLite log as a reader sees Kafka: no waker, so the dispatcher waits in its poll."""

    def waker(self) -> None:
        return None


class _Spawner:
    """Records starts; a test ends a coordinator with :meth:`end`."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        self.started: list[tuple[float, str]] = []
        self._ended: list[CoordinatorExit] = []
        self._theirs: list[Connection] = []

    def fileno(self) -> int:
        return self._read

    def spawn(self, token: str, record: Any, dequeued_at: Any = None) -> CoordinatorSession:
        self.started.append((time.monotonic(), token))
        ours, theirs = socket.socketpair()
        self._theirs.append(Connection(theirs.detach()))  # says a word only when told
        return CoordinatorSession(token, Connection(ours.detach()))

    def end(self, token: str, returncode: int) -> None:
        self._ended.append(CoordinatorExit(token, returncode, 0))
        os.write(self._write, b".")

    def finish(self, token: str) -> None:
        """The coordinator says its request is done (its result durable)."""
        self._theirs[int(token.removeprefix("c"))].send(("done", 0))

    def exits(self, timeout_s: float = 0.0) -> list[CoordinatorExit]:
        os.read(self._read, 100)
        ended, self._ended = self._ended, []
        return ended

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
        for end in self._theirs:
            end.close()


def test_a_dispatcher_waiting_in_the_poll_restarts_a_crashed_request_on_time(
    tmp_path: Path,
) -> None:
    log = _NoWakerLog(tmp_path / "events.db")
    spawner, state = _Spawner(), RuntimeState(tmp_path / "state.db")
    options = DispatcherOptions(crash_backoff_s=0.3, idle_poll_s=2.0)
    dispatcher = Dispatcher(log, spawner, state, options)  # type: ignore[arg-type]

    def step_until(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(spawner.started) < count and time.monotonic() < deadline:
            dispatcher.step()

    try:
        publish_request(log, new_request("reboot", devices=["sim-0001"]))
        step_until(1)
        crashed = time.monotonic()
        spawner.end(spawner.started[0][1], -9)
        step_until(2)
    finally:
        dispatcher.close()
        spawner.close()
        state.close()
        log.close()
    assert len(spawner.started) == 2, "the crashed request never started again"
    # Due after its 0.3 s backoff: the wait in the poll (up to 2 s) ends then.
    assert 0.25 <= spawner.started[1][0] - crashed < 0.6


def test_a_nearly_full_lane_does_not_slow_the_reading_of_the_others(tmp_path: Path) -> None:
    """A low backlog of one device's requests (one runs, the rest wait their
    turn) leaves its lane a place or two at a time; the high lane is still read
    in whole batches, not one record per round."""
    log = SqliteEventLog(tmp_path / "events.db")
    spawner, state = _Spawner(), RuntimeState(tmp_path / "state.db")
    options = DispatcherOptions(buffer=64)
    dispatcher = Dispatcher(log, spawner, state, options)  # type: ignore[arg-type]
    try:
        for _ in range(70):
            publish_request(
                log, new_request("reboot", devices=["sim-0001"], priority="low", partition_key="k")
            )
        for _ in range(3):
            dispatcher.step(wait_s=0.0)
        [(_, token)] = spawner.started
        assert len(dispatcher.lanes[Priority.LOW].buffer) >= 60  # nearly full, all of "k"
        spawner.finish(token)  # the next of "k" runs in its place: a place free
        dispatcher.step(wait_s=0.1)
        for _ in range(50):
            publish_request(log, new_request("reboot", devices=["sim-0002"], priority="high"))
        dispatcher.step(wait_s=0.0)
        read = len(dispatcher.lanes[Priority.HIGH].buffer) + len(spawner.started) - 1
        assert read >= 40, read
    finally:
        dispatcher.close()
        spawner.close()
        state.close()
        log.close()
