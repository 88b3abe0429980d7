"""Poison records on every topic and poison HTTP deliveries.

What a user would notice: ``mayfly up`` keeps serving the requests behind a
poison record, the aggregator thread keeps reading results (its offset moves
past the poison), the poison is on the dead-letter topic once with a reason
that names the field, and the Knative functions answer what Knative
understands (an empty 202 or 400, or a reply event), never a plain-text 500
or a 503 that would have the broker redeliver input that cannot succeed.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from functions_framework import create_app
from kafka import KafkaProducer

from mayfly.app.local import Runtime
from mayfly.app.wiring import build_aggregator, open_event_log
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.eventlog import EventLog
from mayfly.eventlog.publisher import publish_request
from mayfly.events import (
    CoordinatorInfo,
    DeviceResult,
    DeviceStatus,
    MayflyEvent,
    OverallStatus,
    PackageRef,
    TaskCompleted,
    TaskRejected,
    Timings,
    from_http,
    from_kafka,
    new_request,
    to_http,
)
from mayfly.runtime.dispatcher import DispatchEvent
from mayfly.settings import Settings
from mayfly.testing import publish_folders

ROOT = Path(__file__).parents[2]
REQUESTED = "dev.mayfly.task.requested"
COMPLETED = "dev.mayfly.task.completed"
DEEP = 100_000  # levels of nesting: far past Python's recursion limit
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

Header = tuple[str, bytes]


# --- poison records -----------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A raw record, the request id its rejection carries (None: its id cannot be
    read), and the field its rejection must name."""

    name: str
    key: bytes
    value: bytes
    headers: list[Header]
    request_id: str | None
    field_ok: Callable[[str | None], bool]


def _binary_headers(event_id: str, event_type: str = REQUESTED) -> list[Header]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_source", b"/hostile"),
        ("ce_type", event_type.encode()),
        ("content-type", b"application/json"),
    ]


def many_headers_poison() -> Poison:
    """2,000 ``ce_`` headers of 600 bytes (1.2 MB of attributes), and data that is not
    a valid request, so its rejection would copy every attribute."""
    extensions = [(f"ce_x{i}", b"v" * 600) for i in range(2000)]
    return Poison(
        "2000-headers",
        b"sim-0001",
        b'{"task": "reboot"}',
        _binary_headers("poison-headers") + extensions,
        "poison-headers",
        lambda f: f in {f"x{i}" for i in range(2000)},
    )


def deep_binary_poison() -> Poison:
    return Poison(
        "deep-binary",
        b"sim-0001",
        b"[" * DEEP,
        _binary_headers("poison-deep"),
        "poison-deep",
        lambda f: f == "data",
    )


def deep_params_poison() -> Poison:
    """Valid JSON, balanced brackets, nested 100,000 levels inside ``params``."""
    nested = b"[" * DEEP + b"1" + b"]" * DEEP
    value = b'{"task": "reboot", "devices": ["sim-0001"], "params": {"a": ' + nested + b"}}"
    return Poison(
        "deep-params",
        b"sim-0001",
        value,
        _binary_headers("poison-deep-params"),
        "poison-deep-params",
        lambda f: f is not None and f.startswith("data"),
    )


def deep_structured_poison() -> Poison:
    """Its attributes are in the JSON that cannot be parsed: its rejection has no id."""
    envelope = {
        "specversion": "1.0",
        "id": "poison-deep-structured",
        "source": "/hostile",
        "type": REQUESTED,
    }
    value = json.dumps(envelope).encode()[:-1] + b', "data": ' + b"[" * DEEP
    return Poison(
        "deep-structured",
        b"sim-0001",
        value,
        [("content-type", b"application/cloudevents+json; charset=utf-8")],
        None,
        lambda f: f == "data",
    )


def lone_surrogate_poison() -> Poison:
    """Valid JSON (a lone surrogate escape), but no event holding it can be encoded:
    copied into a rejection, it made the rejection itself fail to encode."""
    event = {
        "specversion": "1.0",
        "id": "poison-\ud800",
        "source": "/hostile",
        "type": REQUESTED,
        "data": {"task": "reboot", "devices": ["sim-0001"]},
    }
    return Poison(
        "lone-surrogate",
        b"sim-0001",
        json.dumps(event).encode(),  # ensure_ascii: the escape stays "\ud800"
        [("content-type", b"application/cloudevents+json")],
        "poison-\\ud800",  # the id as the rejection can carry it, escaped
        lambda f: f == "id",
    )


LANE_POISONS = [
    many_headers_poison,
    deep_binary_poison,
    deep_params_poison,
    deep_structured_poison,
    lone_surrogate_poison,
]


# --- a local runtime on a tmp home -------------------------------------------------


@dataclass
class Home:
    root: Path
    inventory: Path
    extra: dict[str, str] = field(default_factory=dict)

    def settings(self) -> Settings:
        # os.environ is already clean: tests/conftest.py's isolated_environment.
        env = dict(os.environ)
        env |= {"MAYFLY_HOME": str(self.root), "MAYFLY_INVENTORY": str(self.inventory)}
        return Settings.from_env(env | self.extra)

    def log(self) -> EventLog:
        return open_event_log(self.settings())

    def read(self, topic: str, *, want: int = 0, timeout_s: float = 0.0) -> list[MayflyEvent]:
        """Every event on ``topic`` (waiting up to ``timeout_s`` for ``want`` of them)."""
        log = self.log()
        try:
            consumer = log.consumer(f"test-{uuid.uuid4().hex[:8]}", topic)
            found: list[MayflyEvent] = []
            deadline = time.monotonic() + timeout_s
            while True:
                records = consumer.poll(1000, 0.5 if timeout_s else 0.0)
                found += [from_kafka(r.headers, r.key, r.value) for r in records]
                if not records and (len(found) >= want or time.monotonic() > deadline):
                    break
            consumer.close()
            return found
        finally:
            log.close()


def _home(tmp_path: Path, **extra: str) -> Iterator[Home]:
    home = Home(tmp_path / "home", tmp_path / "inventory.json", extra)
    publish_folders(home.settings(), [ROOT / "taskpkgs" / "reboot"])
    with SimulatorServer(Simulator(2, reboot_time=0.05)) as server:
        home.inventory.write_bytes(server.inventory().to_json())
        yield home


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    yield from _home(tmp_path)


@pytest.fixture
def kafka_home(tmp_path: Path, kafka_bootstrap: str) -> Iterator[Home]:
    yield from _home(
        tmp_path,
        MAYFLY_EVENT_LOG=f"kafka://{kafka_bootstrap}",
        MAYFLY_TOPIC_PREFIX=f"mayfly-hostile-{uuid.uuid4().hex[:8]}",
    )


class Collector:
    """The ingest's ``on_events``: what the aggregator was handed."""

    def __init__(self) -> None:
        self.events: list[MayflyEvent] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[MayflyEvent]) -> None:
        with self.lock:
            self.events += events

    def completed(self, request_id: str) -> bool:
        with self.lock:
            return any(
                isinstance(e, TaskCompleted) and e.request_id == request_id for e in self.events
            )


def _serve(home: Home, done: Callable[[Collector], bool], timeout_s: float) -> Collector:
    """Run the runtime as ``mayfly up`` does (dispatcher, coordinators, the aggregator
    thread with its archive and traces) until ``done`` or the timeout."""
    settings = home.settings()
    collector = Collector()
    runtime = Runtime(settings)
    runtime.spawner.start()  # before telemetry's threads, as `mayfly up`
    aggregation = build_aggregator(settings, on_events=collector)
    runtime.ingest = aggregation.ingest
    runtime.start()
    deadline = time.monotonic() + timeout_s
    try:
        runtime.run(lambda: done(collector) or time.monotonic() > deadline)
    finally:
        runtime.close()
        aggregation.close()
    return collector


def _aggregator_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mayfly-aggregator"]


def _dead_letters_of(
    home: Home, request_id: str | None, *, want: int = 0, timeout_s: float = 0.0
) -> list[TaskRejected]:
    events = home.read(home.settings().topics.dead_letter, want=want, timeout_s=timeout_s)
    return [e for e in events if isinstance(e, TaskRejected) and e.request_id == request_id]


def _poison_then_a_request(home: Home, poison: Poison, topic: str) -> str:
    log = home.log()
    try:
        log.append(topic, poison.key, poison.value, poison.headers)
        return publish_request(log, new_request("reboot", devices=["sim-0001"])).id
    finally:
        log.close()


# --- the runtime: poison on a lane --------------------------------------------------


@pytest.mark.parametrize("make", LANE_POISONS, ids=lambda m: m().name)
def test_a_poison_request_is_dead_lettered_once_and_the_runtime_keeps_serving(
    home: Home, make: Callable[[], Poison]
) -> None:
    poison = make()
    lane = home.settings().topics.lane("normal")
    normal = _poison_then_a_request(home, poison, lane)

    results = _serve(home, lambda c: c.completed(normal), timeout_s=60)

    assert results.completed(normal), "the request after the poison record never completed"
    [dead] = _dead_letters_of(home, poison.request_id)
    assert poison.field_ok(dead.field), (dead.field, dead.reason)
    assert dead.field is not None
    assert dead.field in dead.reason
    assert dead.code == "invalid_event"
    assert len(dead.original) <= 64  # bounded, whatever the poison held
    assert sum(map(len, dead.original.values())) < 100_000

    # Restarted, the runtime does not run the poison again: it was committed.
    started: list[object] = []
    again = Runtime(
        home.settings(), on_dispatch=lambda kind, info: started.append((kind, info["request_id"]))
    )
    again.start()
    until = time.monotonic() + 1.5
    try:
        again.run(lambda: time.monotonic() > until)
    finally:
        again.close()
    assert [s for s in started if s[0] == DispatchEvent.STARTED] == []
    assert len(_dead_letters_of(home, poison.request_id)) == 1


def test_a_coordinator_that_cannot_dead_letter_does_not_stop_the_dispatcher(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes the dispatcher's own dead-letter emit fail, it keeps serving."""
    poison = Poison(
        "crashes",
        b"sim-0001",
        b"{}",
        _binary_headers("poison-crash"),
        "poison-crash",
        lambda f: True,
    )
    lane = home.settings().topics.lane("normal")
    normal = _poison_then_a_request(home, poison, lane)

    # The coordinator process crashes on the poison (as on any bug it may trigger),
    # and the first dead-letter emit refuses the rejection.
    from mayfly.app import warm as local
    from mayfly.coordinator.sinks import EventLogSink
    from mayfly.errors import EventError

    real_run, real_emit = local.WarmCoordinator.run, EventLogSink.emit
    calls: list[MayflyEvent] = []

    def run(self: local.WarmCoordinator, record: object, dequeued_at: object, link: object) -> int:
        if b"poison-crash" in dict(record.headers)["ce_id"]:  # type: ignore[attr-defined]
            os._exit(1)
        return real_run(self, record, dequeued_at, link)  # type: ignore[arg-type]

    def emit(self: EventLogSink, event: MayflyEvent) -> None:
        calls.append(event)
        if isinstance(event, TaskRejected) and len(calls) == 1:
            raise EventError("data", "encodes to 1200000 bytes, over the limit")
        real_emit(self, event)

    monkeypatch.setattr(local.WarmCoordinator, "run", run)
    monkeypatch.setattr(EventLogSink, "emit", emit)

    results = _serve(home, lambda c: c.completed(normal), timeout_s=60)

    assert results.completed(normal)
    [dead] = _dead_letters_of(home, poison.request_id)
    assert "crashed 3 times" in dead.reason


# --- the runtime: poison on the results topic -----------------------------------------


def deep_result_poison() -> Poison:
    return Poison(
        "deep-result",
        b"poison-result",
        b"[" * DEEP,
        _binary_headers("poison-result:completed:0", COMPLETED),
        "poison-result:completed:0",
        lambda f: f == "data",
    )


def deep_structured_result_poison() -> Poison:
    envelope = {"specversion": "1.0", "id": "poison-sr", "source": "/hostile", "type": COMPLETED}
    return Poison(
        "deep-structured-result",
        b"poison-sr",
        json.dumps(envelope).encode()[:-1] + b', "data": ' + b'{"a": ' * DEEP,
        [("content-type", b"application/cloudevents+json")],
        None,
        lambda f: f == "data",
    )


def lone_surrogate_result_poison() -> Poison:
    """A result that decodes but that the archive cannot write (it held the thread)."""
    headers, body = to_http(_result("poison-ls"), "binary")
    data = json.loads(body)
    data["devices"][0]["error"] = "\udc00"
    return Poison(
        "lone-surrogate-result",
        b"poison-ls",
        json.dumps(data).encode(),
        [(k.replace("ce-", "ce_", 1), v.encode()) for k, v in headers.items()],
        "poison-ls:completed:0",
        lambda f: f == "data.devices",
    )


@pytest.mark.parametrize(
    "make",
    [deep_result_poison, deep_structured_result_poison, lone_surrogate_result_poison],
    ids=lambda m: m().name,
)
def test_a_poison_result_does_not_stop_the_aggregator_thread(
    home: Home, make: Callable[[], Poison]
) -> None:
    poison = make()
    results_topic = home.settings().topics.results
    normal = _poison_then_a_request(home, poison, results_topic)
    threads_before = set(_aggregator_threads())
    alive: list[bool] = []

    def done(results: Collector) -> bool:
        alive[:] = [t.is_alive() for t in set(_aggregator_threads()) - threads_before]
        return results.completed(normal) or alive != [True]

    results = _serve(home, done, timeout_s=60)

    assert alive == [True], "the aggregator thread died on the poison result"
    assert results.completed(normal), "the result after the poison never reached the aggregator"
    log = home.log()
    try:
        committed = log.consumer(home.settings().topics.aggregator_group, results_topic).committed()
    finally:
        log.close()
    assert committed.get(0, 0) >= 2  # past the poison (offset 0) and the good result
    [dead] = _dead_letters_of(home, poison.request_id)
    assert poison.field_ok(dead.field), (dead.field, dead.reason)
    assert "data" in dead.reason


# --- the runtime on Kafka: 2,000 headers, a Kafka-only shape ------------------------------


@pytest.mark.kafka
def test_a_record_with_2000_headers_on_kafka_is_dead_lettered_and_the_runtime_keeps_serving(
    kafka_home: Home, kafka_bootstrap: str
) -> None:
    poison = many_headers_poison()
    topics = kafka_home.settings().topics
    log = kafka_home.log()
    try:
        log.consumer("warmup", topics.lane("normal")).close()  # the lane, as Mayfly makes it
    finally:
        log.close()
    # 1.2 MB of headers: past the producer's default request limit, so sent
    # compressed (the broker checks the compressed size), as a hostile client may.
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, max_request_size=4_000_000, compression_type="gzip"
    )
    try:
        producer.send(
            topics.lane("normal"), key=poison.key, value=poison.value, headers=poison.headers
        ).get(30)
    finally:
        producer.close()
    normal = new_request("reboot", devices=["sim-0001"])  # same key: after the poison
    log = kafka_home.log()
    try:
        publish_request(log, normal, topics=topics)
    finally:
        log.close()

    results = _serve(kafka_home, lambda c: c.completed(normal.id), timeout_s=120)

    assert results.completed(normal.id), "the request after the poison record never completed"
    [dead] = _dead_letters_of(kafka_home, poison.request_id, want=1, timeout_s=20)
    assert poison.field_ok(dead.field), (dead.field, dead.reason)
    assert dead.field is not None
    assert dead.field in dead.reason


# --- the Knative functions ---------------------------------------------------------------


COORDINATOR = ROOT / "functions" / "coordinator" / "main.py"
AGGREGATOR = ROOT / "functions" / "aggregator" / "main.py"


def _http_deep_binary() -> tuple[dict[str, str], bytes]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "http-deep",
        "ce-source": "/hostile",
        "ce-type": REQUESTED,
        "content-type": "application/json",
    }
    return headers, b"[" * DEEP


def _http_deep_structured(event_type: str = REQUESTED) -> tuple[dict[str, str], bytes]:
    envelope = {"specversion": "1.0", "id": "http-deep-s", "source": "/hostile", "type": event_type}
    body = json.dumps(envelope).encode()[:-1] + b', "data": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    return {"content-type": "application/cloudevents+json"}, body


def _http_crlf_id() -> tuple[dict[str, str], bytes]:
    event = {
        "specversion": "1.0",
        "id": "evil\r\nX-Injected: 1",
        "source": "/hostile",
        "type": REQUESTED,
        "data": {"task": "reboot", "devices": ["sim-0001"]},
    }
    return {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()


def _http_crlf_tracestate() -> tuple[dict[str, str], bytes]:
    """A request valid in every other way, whose tracestate would split a header."""
    request = new_request("reboot", devices=["sim-0001"], traceparent=TRACEPARENT)
    headers, body = to_http(request, "structured")
    event = json.loads(body)
    event["tracestate"] = "mayfly=1\r\nX-Injected: 1"
    return headers, json.dumps(event).encode()


def _http_lone_surrogate() -> tuple[dict[str, str], bytes]:
    poison = lone_surrogate_poison()
    return {"content-type": "application/cloudevents+json"}, poison.value


def _http_many_headers() -> tuple[dict[str, str], bytes]:
    headers, _ = _http_deep_binary()
    headers["ce-id"] = "http-headers"
    headers |= {f"ce-x{i}": "v" * 600 for i in range(2000)}
    return headers, b'{"task": "reboot"}'


HTTP_POISONS = {
    "deep-binary": (_http_deep_binary, lambda f: f == "data"),
    "deep-structured": (_http_deep_structured, lambda f: f == "data"),
    "crlf-id": (_http_crlf_id, lambda f: f == "id"),
    "lone-surrogate": (_http_lone_surrogate, lambda f: f == "id"),
    "2000-headers": (_http_many_headers, lambda f: f is not None and f.startswith("x")),
}


def _result(request_id: str = "req-hostile") -> TaskCompleted:
    now = datetime.now(UTC)
    return TaskCompleted(
        request_id=request_id,
        task="reboot",
        package=PackageRef(name="reboot", version="1.0.0", digest="sha256:" + "ab" * 32),
        status=OverallStatus.SUCCEEDED,
        devices=(DeviceResult(device_id="sim-0001", status=DeviceStatus.SUCCEEDED),),
        timings=Timings(received_at=now, started_at=now, finished_at=now),
        coordinator=CoordinatorInfo(id="c1", host="h", pid=1, mode="local"),
        traceparent=TRACEPARENT,
    )


def _result_deep_binary() -> tuple[dict[str, str], bytes]:
    headers, _ = to_http(_result(), "binary")
    return headers, b"[" * DEEP


def _result_deep_structured() -> tuple[dict[str, str], bytes]:
    headers, body = to_http(_result(), "structured")
    return headers, body[: body.index(b'"data":')] + b'"data": ' + b'{"a": ' * DEEP


def _result_crlf_tracestate() -> tuple[dict[str, str], bytes]:
    headers, body = to_http(_result(), "structured")
    event = json.loads(body)
    event["tracestate"] = "mayfly=1\r\nX-Injected: 1"
    return headers, json.dumps(event).encode()


def _result_lone_surrogate() -> tuple[dict[str, str], bytes]:
    headers, body = to_http(_result(), "binary")
    data = json.loads(body)
    data["devices"][0]["error"] = "\udc00"
    return headers, json.dumps(data).encode()


def _result_many_headers() -> tuple[dict[str, str], bytes]:
    headers, body = to_http(_result(), "binary")
    return headers | {f"ce-x{i}": "v" * 600 for i in range(2000)}, body


class SinkServer:
    """A K_SINK that takes every CloudEvent POSTed to it (202)."""

    def __init__(self) -> None:
        self.received: list[MayflyEvent] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"] or 0))
                received.append(from_http(dict(self.headers.items()), body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink_server() -> Iterator[SinkServer]:
    server = SinkServer()
    yield server
    server.close()


@pytest.fixture
def function_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    monkeypatch.setenv("MAYFLY_INVENTORY", str(tmp_path / "inventory.json"))
    return home


def _coordinator(monkeypatch: pytest.MonkeyPatch, sink: str) -> FlaskClient:
    monkeypatch.setenv("MAYFLY_RESULT_SINK", sink)
    return create_app(target="coordinator", source=str(COORDINATOR)).test_client()


@pytest.mark.parametrize("case", list(HTTP_POISONS))
def test_the_coordinator_function_acks_a_poison_event_and_sinks_its_rejection(
    function_home: Path,
    sink_server: SinkServer,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    make, field_ok = HTTP_POISONS[case]
    client = _coordinator(monkeypatch, sink_server.url)
    headers, body = make()

    response = client.post("/", headers=headers, data=body)

    # 202: taken. Not 503 (redelivered for ever), not a plain-text 500.
    assert (response.status_code, response.data) == (202, b"")
    [rejected] = sink_server.received
    assert isinstance(rejected, TaskRejected)
    assert field_ok(rejected.field), (rejected.field, rejected.reason)
    assert rejected.field is not None
    assert rejected.field in rejected.reason


@pytest.mark.parametrize("case", list(HTTP_POISONS))
def test_the_coordinator_function_replies_to_a_poison_event_with_its_rejection(
    function_home: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    make, field_ok = HTTP_POISONS[case]
    client = _coordinator(monkeypatch, "-")  # no K_SINK: the reply is the outcome
    headers, body = make()

    response = client.post("/", headers=headers, data=body)

    assert response.status_code == 200, response.data[:200]
    assert response.headers["ce-type"] == "dev.mayfly.task.rejected"
    assert all("\r" not in v and "\n" not in v for _, v in response.headers.items())
    rejected = from_http(dict(response.headers.items()), response.data)
    assert isinstance(rejected, TaskRejected)
    assert field_ok(rejected.field), (rejected.field, rejected.reason)
    assert len(response.data) < 100_000


@pytest.fixture
def aggregator(function_home: Path) -> Iterator[FlaskClient]:
    app = create_app(target="aggregator", source=str(AGGREGATOR))
    yield app.test_client()
    sys.modules["main"].service().close()


@pytest.mark.parametrize(
    "make",
    [
        _result_deep_binary,
        _result_deep_structured,
        _result_lone_surrogate,
        _result_many_headers,
    ],
    ids=["deep-binary", "deep-structured", "lone-surrogate", "2000-headers"],
)
def test_the_aggregator_function_answers_a_poison_event_with_an_empty_400(
    aggregator: FlaskClient, make: Callable[[], tuple[dict[str, str], bytes]]
) -> None:
    headers, body = make()

    response = aggregator.post("/", headers=headers, data=body)

    # 400: Knative's "unparsable", straight to the Trigger's dead-letter sink.
    assert (response.status_code, response.data) == (400, b"")


def test_a_tracestate_that_would_split_a_header_is_dropped_not_a_rejection(
    function_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bad trace context only starts a new trace (W3C): the request is judged
    # on the rest (here: no package published), the result is taken.
    client = _coordinator(monkeypatch, "-")
    headers, body = _http_crlf_tracestate()
    response = client.post("/", headers=headers, data=body)
    assert response.status_code == 200, response.data[:200]
    assert all("\r" not in v and "\n" not in v for _, v in response.headers.items())
    outcome = from_http(dict(response.headers.items()), response.data)
    assert isinstance(outcome, TaskRejected)
    assert outcome.field != "tracestate", outcome.reason
    assert (outcome.traceparent, outcome.tracestate) == (TRACEPARENT, None)


def test_the_aggregator_takes_a_result_whose_tracestate_would_split_a_header(
    aggregator: FlaskClient,
) -> None:
    headers, body = _result_crlf_tracestate()
    assert aggregator.post("/", headers=headers, data=body).status_code == 202


def test_the_aggregator_function_still_takes_a_good_result(aggregator: FlaskClient) -> None:
    headers, body = to_http(_result(), "binary")
    response = aggregator.post("/", headers=headers, data=body)
    assert (response.status_code, response.data) == (202, b"")
