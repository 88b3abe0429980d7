"""The Kafka-to-HTTP bridge of the local overlay keeps a KafkaSource's promises.

Over the embedded event log (the Kafka log's twin, same consumer contract) and a real
HTTP server on loopback: records arrive in order as binary-mode CloudEvents, an offset is
committed only after a 2xx, a sink that fails is retried without skipping, and one that
refuses an event for good (4xx) does not hold the topic up.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mayfly.app.kafkabridge import BridgeSettings, http_headers, run
from mayfly.errors import ConfigError
from mayfly.eventlog import LogRecord
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import new_request, to_kafka_record

TOPIC, GROUP = "mayfly.requests.normal", "bridge"


class _Sink(http.server.ThreadingHTTPServer):
    """Answers each POST with the next status of ``answers`` (then 202), recording it."""

    def __init__(self, answers: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.received: list[tuple[dict[str, str], bytes, int]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Sink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.server.answers.pop(0) if self.server.answers else 202
        self.server.received.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def log(tmp_path: Path) -> Iterator[SqliteEventLog]:
    with SqliteEventLog(tmp_path / "log.db") as event_log:
        yield event_log


def _sink(answers: list[int]) -> Iterator[_Sink]:
    server = _Sink(answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str):  # type: ignore[no-untyped-def]
    def post(headers: dict[str, str], body: bytes) -> int:
        return requests.post(url, headers=headers, data=body, timeout=5).status_code

    return post


def _publish(log: SqliteEventLog, count: int) -> list[str]:
    ids = []
    for n in range(count):
        request = new_request("reboot", devices=[f"sim-{n:04d}"])
        key, value, headers = to_kafka_record(request)
        log.append(TOPIC, key, value, headers)
        ids.append(request.id)
    return ids


def _until(count: int, sink: _Sink, stop: threading.Event) -> None:
    def watch() -> None:
        while sum(1 for *_, s in sink.received if s < 300) < count:
            if stop.wait(0.02):
                return
        stop.set()

    threading.Thread(target=watch, daemon=True).start()


def test_records_arrive_in_order_as_binary_cloudevents_and_are_committed(
    log: SqliteEventLog,
) -> None:
    ids = _publish(log, 3)
    for sink in _sink([]):
        stop = threading.Event()
        _until(3, sink, stop)
        consumer = log.consumer(GROUP, TOPIC)
        assert run(consumer, _post(sink.url), stop) == 3
        sent = [headers for headers, _, _ in sink.received]
    assert [h["ce-id"] for h in sent] == ids
    assert all(h["ce-type"] == "dev.mayfly.task.requested" for h in sent)
    assert all(h["traceparent"].startswith("00-") for h in sent if "traceparent" in h)
    assert all(h["Content-Type"].startswith("application/json") for h in sent)
    # Committed: the group reads nothing again.
    assert log.consumer(GROUP, TOPIC).poll(timeout_s=0.2) == []


def test_a_failing_sink_is_retried_and_nothing_is_skipped(log: SqliteEventLog) -> None:
    ids = _publish(log, 2)
    for sink in _sink([503, 503, 429]):
        stop = threading.Event()
        _until(2, sink, stop)
        assert run(log.consumer(GROUP, TOPIC), _post(sink.url), stop) == 2
        statuses = [(h["ce-id"], status) for h, _, status in sink.received]
    first, second = ids
    assert statuses == [(first, 503), (first, 503), (first, 429), (first, 202), (second, 202)]


def test_a_stop_while_the_sink_is_down_commits_nothing(log: SqliteEventLog) -> None:
    ids = _publish(log, 1)
    for sink in _sink([503] * 100):
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        assert run(log.consumer(GROUP, TOPIC), _post(sink.url), stop) == 0
    # At least once: the next bridge of the group gets the record again.
    again = log.consumer(GROUP, TOPIC).poll(timeout_s=0.5)
    assert [dict(r.headers)["ce_id"].decode() for r in again] == ids


def test_an_event_the_sink_refuses_for_good_does_not_hold_the_topic(
    log: SqliteEventLog,
) -> None:
    ids = _publish(log, 2)
    for sink in _sink([400]):
        stop = threading.Event()
        _until(1, sink, stop)
        assert run(log.consumer(GROUP, TOPIC), _post(sink.url), stop) == 2
        statuses = [(h["ce-id"], status) for h, _, status in sink.received]
    assert statuses == [(ids[0], 400), (ids[1], 202)]


def test_headers_map_kafka_binary_mode_to_http_binary_mode() -> None:
    record = LogRecord(
        topic=TOPIC,
        partition=0,
        offset=0,
        key=b"k",
        value=b"{}",
        headers=(
            ("ce_id", b"r1"),
            ("ce_specversion", b"1.0"),
            ("content-type", b"application/json"),
            ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("x-other", b"dropped"),
        ),
    )
    assert http_headers(record) == {
        "ce-id": "r1",
        "ce-specversion": "1.0",
        "Content-Type": "application/json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


def test_settings_name_what_is_missing_or_wrong() -> None:
    with pytest.raises(ConfigError, match="MAYFLY_BRIDGE_GROUP, K_SINK"):
        BridgeSettings.from_env({"MAYFLY_BRIDGE_TOPIC": TOPIC})
    with pytest.raises(ConfigError, match="not an http"):
        BridgeSettings.from_env(
            {"MAYFLY_BRIDGE_TOPIC": TOPIC, "MAYFLY_BRIDGE_GROUP": GROUP, "K_SINK": "kafka://x"}
        )


def test_a_record_whose_headers_http_cannot_carry_does_not_hold_the_topic(
    log: SqliteEventLog,
) -> None:
    # Anyone can write a Kafka header: one with CR/LF or a name that is no HTTP token
    # must not be sent (header injection) nor retried for ever (the lane would stop).
    request = new_request("reboot", devices=["sim-0001"])
    key, value, headers = to_kafka_record(request)
    hostile = [*headers, ("ce_x\r\nx-injected", b"1"), ("ce_note", b"a\r\nx-injected: 1")]
    log.append(TOPIC, key, value, hostile)
    (second,) = _publish(log, 1)
    for sink in _sink([]):
        stop = threading.Event()
        _until(2, sink, stop)
        assert run(log.consumer(GROUP, TOPIC), _post(sink.url), stop) == 2
        sent = [h for h, _, _ in sink.received]
    assert [h["ce-id"] for h in sent] == [request.id, second]
    assert not any(
        "x-injected" in k.lower() or "x-injected" in v for h in sent for k, v in h.items()
    )
