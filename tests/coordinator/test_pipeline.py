"""One request pipeline behind every transport: HTTP, job mode and the local runtime."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import responses

from mayfly.app.warm import WarmCoordinator
from mayfly.coordinator import ExitCode, Handled, RequestPipeline
from mayfly.coordinator.http import answer_http
from mayfly.coordinator.sinks import EventLogSink, FileSink
from mayfly.errors import SinkError
from mayfly.eventlog import LogRecord
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    from_http,
    from_kafka,
    new_request,
    peek_attributes,
    to_http,
    to_kafka_record,
)
from mayfly.runtime.session import DirectLink
from mayfly.settings import Settings
from mayfly.topics import Topics

from .conftest import Env, FleetFactory

DATA = Path(__file__).parents[1] / "data"


def _link(settings: Settings) -> DirectLink:
    """What the runtime's appender would do with the coordinator's records."""
    return DirectLink(SqliteEventLog(Path(settings.event_log)))


def _completed() -> TaskCompleted:
    event = from_http(
        {"content-type": "application/cloudevents+json"}, (DATA / "completed.json").read_bytes()
    )
    assert isinstance(event, TaskCompleted)
    return event


class _Refusing:
    def emit(self, event: MayflyEvent) -> None:
        raise SinkError("the sink is down")

    def close(self) -> None:
        pass


def _handle(pipeline: RequestPipeline, event_bytes: tuple[dict[str, str], bytes]) -> Handled:
    headers, body = event_bytes
    return pipeline.handle(
        lambda: from_http(headers, body),
        lambda: peek_attributes(headers, body),
        received_at=datetime.now(UTC),
    )


def test_a_request_runs_and_its_result_is_delivered(env: Env, fleet: FleetFactory) -> None:
    fleet(2)
    coordinator = env.coordinator()
    pipeline = RequestPipeline(lambda: coordinator, FileSink(env.results))
    handled = _handle(pipeline, to_http(new_request("reboot", devices=["sim-0001"]), "binary"))
    assert handled.code is ExitCode.OK
    assert isinstance(handled.outcome, TaskCompleted)
    [delivered] = env.result_events()
    assert delivered["type"] == "dev.mayfly.task.completed"
    assert delivered["data"]["request_id"] == handled.outcome.request_id


def test_a_broken_event_is_rejected_with_the_reason_and_delivered(env: Env) -> None:
    coordinator = env.coordinator()
    pipeline = RequestPipeline(lambda: coordinator, FileSink(env.results))
    handled = _handle(pipeline, ({"content-type": "application/json"}, b"{not json"))
    assert handled.code is ExitCode.REJECTED
    assert isinstance(handled.outcome, TaskRejected)
    [delivered] = env.result_events()
    assert delivered["type"] == "dev.mayfly.task.rejected"
    assert delivered["data"]["reason"] == handled.outcome.reason


def test_an_outcome_the_sink_refuses_is_undelivered_not_lost_silently(env: Env) -> None:
    coordinator = env.coordinator()
    pipeline = RequestPipeline(lambda: coordinator, _Refusing())
    handled = _handle(pipeline, ({"content-type": "application/json"}, b"[]"))
    assert handled.code is ExitCode.UNDELIVERED
    assert not handled.code.result_durable
    assert handled.error is not None
    assert "the sink is down" in handled.error


def test_over_http_a_request_its_schedule_holds_is_answered_retry_after(
    env: Env, fleet: FleetFactory
) -> None:
    """Not a 202 (the Trigger would drop it) nor a result: a 503 saying when
    to redeliver it, and no device touched."""
    server = fleet(1)
    opens = datetime.now(UTC) + timedelta(minutes=10)
    request = new_request(
        "reboot", devices=["sim-0001"], rollout={"schedule": {"not_before": opens.isoformat()}}
    )
    coordinator = env.coordinator()
    for sink in (FileSink(env.results), None):
        status, headers, body = answer_http(
            RequestPipeline(lambda: coordinator, sink), *to_http(request, "binary")
        )
        assert (status, body) == (503, b"")
        assert 595 <= int(headers["Retry-After"]) <= 600, headers
    assert env.result_events() == []
    assert server.simulator.records("sim-0001")["last_request_at"] is None


def test_over_http_a_held_request_goes_to_the_deferred_topic_marked_and_is_acknowledged(
    env: Env, fleet: FleetFactory
) -> None:
    """With a defer sink (Knative's deferred KafkaSink), a held request is put
    there marked with when it may start, and the delivery ends with a 202;
    when that sink fails, the 503 with Retry-After still holds it."""
    fleet(1)
    opens = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=0)
    request = new_request(
        "reboot", devices=["sim-0001"], rollout={"schedule": {"not_before": opens.isoformat()}}
    )
    coordinator = env.coordinator()
    pipeline = RequestPipeline(lambda: coordinator, FileSink(env.results))
    put: list[tuple[dict[str, str], bytes]] = []
    answer = answer_http(
        pipeline, *to_http(request, "structured"), defer=lambda h, b: put.append((h, b))
    )
    assert answer == (202, {}, b"")
    [(headers, body)] = put
    assert headers["ce-notbefore"] == opens.isoformat()
    assert from_http(headers, body).id == request.id  # binary mode, the request as it was

    def down(_headers: dict[str, str], _body: bytes) -> None:
        raise SinkError("the deferred sink is down")

    status, retry, _ = answer_http(pipeline, *to_http(request, "binary"), defer=down)
    assert status == 503
    assert int(retry["Retry-After"]) > 500
    assert env.result_events() == []


# -- a Mayfly output event where a request was expected: passed over everywhere --


def test_http_passes_a_result_over_with_an_empty_202(env: Env) -> None:
    coordinator = env.coordinator()
    for sink in (FileSink(env.results), None):  # K_SINK set, and reply mode
        answer = answer_http(
            RequestPipeline(lambda: coordinator, sink), *to_http(_completed(), "binary")
        )
        assert answer == (202, {}, b"")
    assert env.result_events() == []


def test_job_mode_passes_a_result_over_and_delivers_nothing(env: Env, tmp_path: Path) -> None:
    event_file = tmp_path / "event"
    event_file.write_bytes(to_http(_completed(), "structured")[1])
    job = subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=env.variables() | {"K_EVENT_PATH": str(event_file)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert job.returncode == ExitCode.OK, job.stderr
    assert "not a request" in job.stderr
    assert env.result_events() == []


def test_the_local_runtime_passes_a_result_over_and_appends_nothing(env: Env) -> None:
    settings = env.settings()
    key, value, headers = to_kafka_record(_completed())
    record = LogRecord(Topics().lane("normal"), 0, 0, key, value, tuple(headers))
    with contextlib.closing(WarmCoordinator(settings)) as warm:
        assert warm.run(record, datetime.now(UTC), _link(settings)) == ExitCode.OK
    log = SqliteEventLog(Path(settings.event_log))
    try:
        consumer = log.consumer("test", Topics().results)
        assert consumer.poll(10, 0.0) == []
    finally:
        log.close()


@pytest.mark.parametrize("lane_record", [b"\x00\xffnot json"])
def test_the_local_runtime_rejects_a_record_that_is_no_cloudevent(
    env: Env, lane_record: bytes
) -> None:
    settings = env.settings()
    record = LogRecord(Topics().lane("normal"), 0, 7, b"junk", lane_record)
    with contextlib.closing(WarmCoordinator(settings)) as warm:
        assert warm.run(record, datetime.now(UTC), _link(settings)) == ExitCode.REJECTED
    log = SqliteEventLog(Path(settings.event_log))
    try:
        for topic in (Topics().results, Topics().dead_letter):
            [found] = log.consumer("test", topic).poll(10, 0.0)
            rejected = from_kafka(found.headers, found.key, found.value)
            assert isinstance(rejected, TaskRejected)
            assert rejected.code == "not_a_cloudevent"
    finally:
        log.close()


def test_the_event_log_sink_honours_the_topic_prefix(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db")
    try:
        topics = Topics("site-b")
        sink = EventLogSink(log, topics)
        rejection = json.loads((DATA / "rejected.json").read_text())
        event = from_http(
            {"content-type": "application/cloudevents+json"}, json.dumps(rejection).encode()
        )
        sink.emit(event)
        assert [r.topic for r in log.consumer("t", "site-b.deadletter").poll(10, 0.0)] == [
            "site-b.deadletter"
        ]
        assert log.consumer("t", "mayfly.deadletter").poll(10, 0.0) == []
    finally:
        log.close()


class _Collecting:
    def __init__(self) -> None:
        self.events: list[MayflyEvent] = []

    def emit(self, event: MayflyEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


def test_a_request_over_the_shard_size_is_published_as_shards_not_run(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    server = fleet(5)
    coordinator = env.coordinator(shard_size=2)
    log = SqliteEventLog(tmp_path / "events.db")
    topics = Topics()
    pipeline = RequestPipeline(
        lambda: coordinator, FileSink(env.results), shards=EventLogSink(log, topics)
    )
    request = new_request("reboot", selector={"ring": "main"}, priority="high")
    handled = _handle(pipeline, to_http(request, "binary"))

    assert (handled.code, handled.outcome, handled.passed_over) == (ExitCode.OK, None, False)
    assert [len(s.devices) for s in handled.shards] == [2, 2]  # the 4 devices of ring main
    consumer = log.consumer("check", topics.lane("high"))
    on_lane = [from_kafka(r.headers, r.key, r.value) for r in consumer.poll(10, 0.0)]
    assert on_lane == list(handled.shards)
    assert env.result_events() == []  # the shards' results will say what happened
    assert server.simulator.duplicates() == []
    assert all(not server.simulator.records(d)["log"] for d in server.simulator.device_ids())


def test_without_a_sink_for_shards_a_large_request_runs_whole(
    env: Env, fleet: FleetFactory
) -> None:
    fleet(5)
    coordinator = env.coordinator(shard_size=2)
    pipeline = RequestPipeline(lambda: coordinator, FileSink(env.results))
    handled = _handle(
        pipeline,
        to_http(
            new_request("reboot", selector={}, devices=["sim-0001", "sim-0002", "sim-0003"]),
            "binary",
        ),
    )
    assert isinstance(handled.outcome, TaskCompleted)
    assert len(handled.outcome.devices) == 3
    assert handled.shards == ()


def test_a_request_sets_its_own_shard_size_and_a_bad_one_is_rejected_whole(
    env: Env, fleet: FleetFactory
) -> None:
    fleet(4)
    shards = _Collecting()
    pipeline = RequestPipeline(lambda: env.coordinator(), FileSink(env.results), shards=shards)
    devices = ["sim-0001", "sim-0002", "sim-0003", "sim-0004"]
    wanted = new_request("reboot", devices=devices, rollout={"shard_size": 1})
    assert len(_handle(pipeline, to_http(wanted, "binary")).shards) == 4
    # Checked before it is cut: an unknown task is one rejection, not shards.
    unknown = new_request("no-such-task", devices=devices, rollout={"shard_size": 1})
    handled = _handle(pipeline, to_http(unknown, "binary"))
    assert isinstance(handled.outcome, TaskRejected)
    assert handled.shards == ()
    assert len(shards.events) == 4


def test_shards_the_sink_refuses_are_undelivered_and_run_again_the_same(
    env: Env, fleet: FleetFactory
) -> None:
    fleet(3)
    request = new_request("reboot", devices=["sim-0001", "sim-0002", "sim-0003"])
    refused = RequestPipeline(
        lambda: env.coordinator(shard_size=1), FileSink(env.results), shards=_Refusing()
    )
    handled = _handle(refused, to_http(request, "binary"))
    assert handled.code is ExitCode.UNDELIVERED
    assert "the sink is down" in (handled.error or "")
    taken = RequestPipeline(
        lambda: env.coordinator(shard_size=1), FileSink(env.results), shards=_Collecting()
    )
    again = _handle(taken, to_http(request, "binary"))
    assert [s.id for s in again.shards] == [s.id for s in handled.shards]


@responses.activate
def test_an_http_shard_sink_sends_no_cancel_where_nothing_reads_one() -> None:
    """A URL per lane (Knative's KafkaSinks) has no control topic: a shard's
    abort is not posted to a lane as if it were a request."""
    from mayfly.coordinator.sinks import HttpSink
    from mayfly.events import TaskCancel

    responses.add(responses.POST, "http://sink.test/requests-normal", status=202)
    HttpSink("http://sink.test/requests-{priority}").emit(TaskCancel.of("r1", 0.0, abort=True))
    assert len(responses.calls) == 0
