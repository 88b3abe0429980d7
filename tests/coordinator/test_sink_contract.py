"""One contract, every result sink: a file, HTTP, and the event log on SQLite and on Kafka.

Each sink is paired with a reader that is not the sink (a fresh file handle, the
HTTP server's record of what it accepted, another event log client in a new
consumer group), so "delivered" means what a consumer would see, decoded back
into Mayfly events. The HTTP server is a real ``http.server`` on 127.0.0.1 that
can be told to refuse or fail; Kafka tests get a unique topic prefix each.
"""

from __future__ import annotations

import abc
import http.server
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mayfly.app.wiring import open_sink
from mayfly.coordinator.sinks import EventLogSink, FileSink, HttpSink, ResultSink, deliver
from mayfly.errors import ConfigError, EventLogError, SinkError
from mayfly.eventlog import EventLog, LogRecord
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import (
    STRUCTURED_CONTENT_TYPE,
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    from_http,
    from_kafka,
    merge_completed,
    to_http,
)
from mayfly.settings import ENV_HOME, ENV_RESULT_SINK, ENV_TOPIC_PREFIX, Settings
from mayfly.topics import Topics

from ..aggregator.conftest import DATA, device, result

KAFKA_RECORD_LIMIT = 1024 * 1024  # Kafka's default message.max.bytes
WAIT_S = 10.0


def structured(body: bytes | str) -> MayflyEvent:
    """The event of a structured-mode body (a FileSink line, a golden file)."""
    return from_http({"content-type": STRUCTURED_CONTENT_TYPE}, body)


def _golden(name: str) -> MayflyEvent:
    return structured((DATA / name).read_bytes())


def golden_result() -> TaskCompleted:
    event = _golden("completed.json")
    assert isinstance(event, TaskCompleted)
    return event


def golden_rejection() -> TaskRejected:
    event = _golden("rejected.json")
    assert isinstance(event, TaskRejected)
    return event


def big_result(request_id: str = "req-big") -> TaskCompleted:
    """A result whose data is well over Kafka's 1 MiB record limit."""
    devices = tuple(
        device(f"sim-{i:04d}").model_copy(update={"output": {"log": f"{i:04d}" * 150}})
        for i in range(3000)
    )
    big = result(request_id, devices=devices)
    assert len(big.data_json()) > 2 * KAFKA_RECORD_LIMIT
    return big


# --- a real HTTP receiver ---------------------------------------------------------


@dataclass(frozen=True)
class Received:
    status: int
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST and answers as told."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._planned: deque[int] = deque()
        self._then = 202
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver._next_status()
                # Recorded before the answer: once the client has its answer, it is here.
                with receiver._lock:
                    receiver.requests.append(Received(status, dict(self.headers.items()), body))
                text = b"" if status < 300 else f"no thanks ({status})".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/results"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, *statuses: int, then: int = 202) -> None:
        """Answer the next requests with ``statuses``, every later one with ``then``."""
        with self._lock:
            self._planned = deque(statuses)
            self._then = then

    def _next_status(self) -> int:
        with self._lock:
            return self._planned.popleft() if self._planned else self._then

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT_S)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


class Sleeps(list[float]):
    """A ``sleep`` for HttpSink that records the delays instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --- the sinks under test, each with an independent reader ------------------------


class SinkCase(abc.ABC):
    sink: ResultSink

    @abc.abstractmethod
    def delivered(self) -> list[MayflyEvent]:
        """Everything the sink delivered, read back by another reader."""

    @abc.abstractmethod
    def visible_now(self) -> int:
        """How many events another reader sees right now, without waiting."""

    @abc.abstractmethod
    def cannot_deliver(self) -> None:
        """Make the sink unable to deliver from now on."""

    def close(self) -> None:
        self.sink.close()


class FileCase(SinkCase):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sink = FileSink(path)

    def _lines(self) -> list[bytes]:
        return self.path.read_bytes().splitlines() if self.path.exists() else []

    def delivered(self) -> list[MayflyEvent]:
        return [structured(line) for line in self._lines()]

    def visible_now(self) -> int:
        return len(self._lines())

    def cannot_deliver(self) -> None:
        blocker = self.path.parent / "not-a-folder"
        blocker.write_bytes(b"a file where the sink needs a folder")
        self.sink = FileSink(blocker / "results.jsonl")


class HttpCase(SinkCase):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.sleeps = Sleeps()
        self.sink = HttpSink(receiver.url, sleep=self.sleeps)

    def delivered(self) -> list[MayflyEvent]:
        return [from_http(r.headers, r.body) for r in self.receiver.accepted()]

    def visible_now(self) -> int:
        return len(self.receiver.accepted())

    def cannot_deliver(self) -> None:
        self.receiver.answer(then=400)


class EventLogCase(SinkCase):
    def __init__(self, log: EventLog, reader: EventLog, topics: Topics) -> None:
        self.log, self.reader, self.topics = log, reader, topics
        self.sink = EventLogSink(log, topics)

    def _records(self, topic: str) -> list[LogRecord]:
        consumer = self.reader.consumer(f"test.reader.{uuid.uuid4().hex}", topic)
        try:
            expected = sum(consumer.end_offsets().values())
            records: list[LogRecord] = []
            deadline = time.monotonic() + WAIT_S
            while len(records) < expected and time.monotonic() < deadline:
                records += consumer.poll(1000, 0.2)
            assert len(records) == expected
            return records
        finally:
            consumer.close()

    def delivered(self) -> list[MayflyEvent]:
        return [from_kafka(r) for r in self._records(self.topics.results)]

    def dead_letters(self) -> list[MayflyEvent]:
        return [from_kafka(r) for r in self._records(self.topics.dead_letter)]

    def visible_now(self) -> int:
        consumer = self.reader.consumer(f"test.reader.{uuid.uuid4().hex}", self.topics.results)
        try:
            return sum(consumer.end_offsets().values())
        finally:
            consumer.close()

    def cannot_deliver(self) -> None:
        self.log.close()

    def close(self) -> None:
        super().close()
        self.log.close()
        self.reader.close()


def _prefix() -> str:
    return f"test.sink.{uuid.uuid4().hex}"


@pytest.fixture(params=["file", "http", "sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SinkCase]:
    made: SinkCase
    if request.param == "file":
        made = FileCase(tmp_path / "out" / "results.jsonl")
    elif request.param == "http":
        made = HttpCase(request.getfixturevalue("receiver"))
    elif request.param == "sqlite":
        path = tmp_path / "log" / "events.db"
        made = EventLogCase(SqliteEventLog(path), SqliteEventLog(path), Topics(_prefix()))
    else:
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        made = EventLogCase(KafkaEventLog(bootstrap), KafkaEventLog(bootstrap), Topics(_prefix()))
    yield made
    made.close()


# --- the contract -------------------------------------------------------------------


def test_a_result_comes_back_identical(case: SinkCase) -> None:
    sent = golden_result()
    case.sink.emit(sent)
    [back] = case.delivered()
    assert isinstance(back, TaskCompleted)
    assert (back.id, back.event_type) == (sent.id, sent.event_type)
    assert back.data_json() == sent.data_json()
    assert back.cloudevent_attributes() == sent.cloudevent_attributes()
    assert back == sent


def test_a_rejection_comes_back_and_event_logs_dead_letter_it_under_the_prefix(
    case: SinkCase,
) -> None:
    sent = golden_rejection()
    assert deliver(case.sink, sent) == 1
    assert case.delivered() == [sent]
    if isinstance(case, EventLogCase):
        assert case.topics.dead_letter != Topics().dead_letter
        assert case.dead_letters() == [sent]


def test_a_result_over_the_kafka_limit_arrives_in_parts_that_merge_back(case: SinkCase) -> None:
    big = big_result()
    count = deliver(case.sink, big)
    assert count >= 3
    parts = case.delivered()
    assert len(parts) == count
    assert all(isinstance(p, TaskCompleted) for p in parts)
    completed = [p for p in parts if isinstance(p, TaskCompleted)]
    assert sorted(p.id for p in completed) == sorted(f"req-big:completed:{i}" for i in range(count))
    assert {p.part.count for p in completed} == {count}
    for part in completed:
        assert len(to_http(part)[1]) < KAFKA_RECORD_LIMIT
    assert merge_completed(reversed(completed)) == big


def test_emit_returns_only_once_another_reader_sees_the_event(case: SinkCase) -> None:
    for i in range(3):
        case.sink.emit(result(f"req-{i}"))
        assert case.visible_now() == i + 1
    assert [e.request_id for e in case.delivered()] == ["req-0", "req-1", "req-2"]


def test_a_sink_that_cannot_deliver_raises_sink_error(case: SinkCase) -> None:
    case.sink.emit(result("req-before"))
    case.cannot_deliver()
    with pytest.raises(SinkError):
        case.sink.emit(result("req-after"))
    with pytest.raises(SinkError):
        deliver(case.sink, golden_rejection())


# --- HTTP: retries, and when it gives up -----------------------------------------------


def test_http_posts_a_binary_mode_cloudevent(receiver: Receiver) -> None:
    sent = golden_result()
    sink = HttpSink(receiver.url, sleep=Sleeps())
    try:
        sink.emit(sent)
    finally:
        sink.close()
    [request] = receiver.requests
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["ce-id"] == sent.id
    assert headers["ce-type"] == "dev.mayfly.task.completed"
    assert headers["content-type"].startswith("application/json")
    assert request.body == sent.data_json()


@pytest.mark.parametrize("busy", [503, 500, 429])
def test_http_retries_a_busy_receiver_until_it_accepts(receiver: Receiver, busy: int) -> None:
    receiver.answer(busy, busy, then=202)
    sleeps = Sleeps()
    sink = HttpSink(receiver.url, sleep=sleeps)
    sent = golden_result()
    try:
        sink.emit(sent)
    finally:
        sink.close()
    assert [r.status for r in receiver.requests] == [busy, busy, 202]
    assert {r.body for r in receiver.requests} == {sent.data_json()}
    assert [from_http(r.headers, r.body) for r in receiver.accepted()] == [sent]
    assert sleeps == [0.2, 0.4]


@pytest.mark.parametrize("refusal", [400, 404, 413])
def test_http_gives_up_at_once_on_a_refusal(receiver: Receiver, refusal: int) -> None:
    receiver.answer(then=refusal)
    sleeps = Sleeps()
    sink = HttpSink(receiver.url, sleep=sleeps)
    try:
        with pytest.raises(SinkError, match=f"HTTP {refusal}: no thanks"):
            sink.emit(golden_result())
    finally:
        sink.close()
    assert len(receiver.requests) == 1
    assert sleeps == []


def test_http_that_fails_every_time_raises_after_its_attempts(receiver: Receiver) -> None:
    receiver.answer(then=503)
    sink = HttpSink(receiver.url, attempts=4, sleep=Sleeps())
    try:
        with pytest.raises(SinkError, match="HTTP 503"):
            sink.emit(golden_result())
    finally:
        sink.close()
    assert [r.status for r in receiver.requests] == [503] * 4


def test_http_backs_off_doubling_and_capped(receiver: Receiver) -> None:
    receiver.answer(then=503)
    sleeps = Sleeps()
    sink = HttpSink(receiver.url, attempts=7, sleep=sleeps)
    try:
        with pytest.raises(SinkError):
            sink.emit(golden_result())
    finally:
        sink.close()
    assert len(receiver.requests) == 7
    assert sleeps[:6] == [0.2, 0.4, 0.8, 1.6, 3.0, 3.0]


def test_http_does_not_wait_after_its_last_attempt(receiver: Receiver) -> None:
    receiver.answer(then=503)
    sleeps = Sleeps()
    sink = HttpSink(receiver.url, attempts=3, sleep=sleeps)
    try:
        with pytest.raises(SinkError):
            sink.emit(golden_result())
    finally:
        sink.close()
    assert len(receiver.requests) == 3
    # A wait after the last attempt only delays the error (and the coordinator's exit).
    assert sleeps == [0.2, 0.4]


def test_http_nobody_listening_raises_sink_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    sink = HttpSink(f"http://127.0.0.1:{port}/results", attempts=3, sleep=sleeps)
    try:
        with pytest.raises(SinkError, match="ConnectionError"):
            sink.emit(golden_result())
    finally:
        sink.close()
    assert len(sleeps) >= 2  # retried, without really waiting


# --- event logs ----------------------------------------------------------------------


def test_an_unreachable_kafka_raises_sink_error() -> None:
    log = KafkaEventLog("127.0.0.1:1", connect_timeout_s=0.5)
    sink = EventLogSink(log, Topics(_prefix()), owns_log=True)
    try:
        with pytest.raises(SinkError, match=r"kafka://127\.0\.0\.1:1"):
            sink.emit(golden_result())
    finally:
        sink.close()


def test_an_event_log_sink_names_topics_under_the_prefix(tmp_path: Path) -> None:
    with SqliteEventLog(tmp_path / "events.db") as log:
        sink = EventLogSink(log, Topics("acme.prod"))
        assert (sink.results_topic, sink.dead_letter_topic) == (
            "acme.prod.results",
            "acme.prod.deadletter",
        )
        custom = EventLogSink(log, Topics("acme.prod"), results="elsewhere")
        assert (custom.results_topic, custom.dead_letter_topic) == (
            "elsewhere",
            "acme.prod.deadletter",
        )


def test_an_event_log_sink_closes_only_a_log_it_owns(tmp_path: Path) -> None:
    with SqliteEventLog(tmp_path / "events.db") as log:
        EventLogSink(log, Topics(_prefix())).close()
        log.append("still.open", None, b"x")  # not closed by a sink that does not own it
        EventLogSink(log, Topics(_prefix()), owns_log=True).close()
        with pytest.raises(EventLogError, match="after close"):
            log.append("still.open", None, b"x")


# --- open_sink: which implementation a target names ----------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({ENV_HOME: str(tmp_path / "home"), ENV_TOPIC_PREFIX: "acme.test"})


@pytest.mark.parametrize("target", ["-", "", "stdout"])
def test_open_sink_stdout(settings: Settings, target: str) -> None:
    sink = open_sink(settings, target)
    assert isinstance(sink, FileSink)
    assert sink.path is None


def test_the_stdout_sink_writes_one_structured_event_per_line(
    settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    sent = golden_result()
    open_sink(settings, "-").emit(sent)
    out = capfd.readouterr().out
    assert out.endswith("\n")
    assert structured(out.strip()) == sent


@pytest.mark.parametrize("form", ["{path}", "file:{path}"])
def test_open_sink_file(settings: Settings, tmp_path: Path, form: str) -> None:
    path = tmp_path / "deep" / "results.jsonl"
    sink = open_sink(settings, form.format(path=path))
    assert isinstance(sink, FileSink)
    assert sink.path == path
    sink.emit(golden_result())
    assert structured(path.read_bytes()) == golden_result()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/results", "https://sink.example/r"])
def test_open_sink_http(settings: Settings, url: str) -> None:
    sink = open_sink(settings, url)
    try:
        assert isinstance(sink, HttpSink)
        assert sink.url == url
    finally:
        sink.close()


@pytest.mark.parametrize(
    ("target", "bootstrap"),
    [
        ("kafka://127.0.0.1:1/acme-results", "127.0.0.1:1"),
        ("kafka://a:9092,b:9092/acme-results", "a:9092,b:9092"),
    ],
)
def test_open_sink_kafka(settings: Settings, target: str, bootstrap: str) -> None:
    sink = open_sink(settings, target)
    try:
        assert isinstance(sink, EventLogSink)
        assert isinstance(sink.log, KafkaEventLog)
        assert sink.log.describe() == f"kafka://{bootstrap}"
        assert sink.results_topic == "acme-results"
        assert sink.dead_letter_topic == "acme.test.deadletter"  # MAYFLY_TOPIC_PREFIX
    finally:
        sink.close()


@pytest.mark.parametrize(
    "target", ["kafka://host", "kafka://host:9092", "kafka://host/", "kafka:///t"]
)
def test_open_sink_refuses_kafka_without_a_topic_or_broker(settings: Settings, target: str) -> None:
    with pytest.raises(ConfigError, match="kafka://HOST:PORT/TOPIC"):
        open_sink(settings, target)


def test_open_sink_defaults_to_the_configured_sink(tmp_path: Path) -> None:
    path = tmp_path / "configured.jsonl"
    settings = Settings.from_env({ENV_HOME: str(tmp_path / "home"), ENV_RESULT_SINK: str(path)})
    sink = open_sink(settings)
    assert isinstance(sink, FileSink)
    assert sink.path == path
