"""Job mode (as a JobSink or the coordinator function runs a request, with no
runtime beside it) on a real Kafka installation log: progress events with a
paced rollout's checkpoints, a cancel read from the control topic, and a
shard's abort stopping its sibling shard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mayfly.coordinator.sinks import EventLogSink
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.events import TaskCancel, TaskRequest, from_kafka, new_request, to_http
from mayfly.topics import Topics

from .conftest import Env, FleetFactory

PUSH = {"config": {"telemetry_interval_s": 99}}


@pytest.fixture
def installation(kafka_bootstrap: str) -> Iterator[tuple[dict[str, str], KafkaEventLog, Topics]]:
    """Job-mode variables naming a Kafka log under a prefix of this test's own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    log = KafkaEventLog(kafka_bootstrap)
    variables = {"MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}", "MAYFLY_TOPIC_PREFIX": prefix}
    yield variables, log, Topics(prefix)
    log.close()


def _event_file(tmp_path: Path, request: TaskRequest) -> Path:
    _, body = to_http(request, "structured")
    path = tmp_path / f"{request.id}.json"
    path.write_bytes(body)
    return path


def _start(env: Env, event: Path, **variables: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=env.variables() | {"K_EVENT_PATH": str(event)} | variables,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its task processes die with it on the kill
    )


def _touched(server: object, ids: list[str]) -> list[str]:
    sim = server.simulator  # type: ignore[attr-defined]
    return [d for d in ids if sim.records(d)["last_request_at"] is not None]


def _wait_for(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _events(log: KafkaEventLog, topic: str, key: str) -> list[object]:
    return [from_kafka(r.headers, r.key, r.value) for r in log.read_key(topic, key.encode(), 0)]


def _requests_on(log: KafkaEventLog, lane: str) -> list[TaskRequest]:
    """Every request on ``lane``, read whole by a group of its own."""
    consumer = log.consumer(f"reader-{uuid.uuid4().hex[:8]}", lane)
    try:
        ends = consumer.end_offsets()
        seen: dict[int, int] = {}
        found: list[TaskRequest] = []
        deadline = time.monotonic() + 30
        while any(seen.get(p, 0) < end for p, end in ends.items()):
            assert time.monotonic() < deadline, (seen, ends)
            for record in consumer.poll(100, 0.5):
                seen[record.partition] = record.offset + 1
                event = from_kafka(record.headers, record.key, record.value)
                if isinstance(event, TaskRequest):
                    found.append(event)
        return found
    finally:
        consumer.close()


def test_a_paced_job_killed_mid_run_goes_on_from_its_checkpoints(
    env: Env, fleet: FleetFactory, installation, tmp_path: Path
) -> None:
    """30 devices at 600 a minute; the job is killed with a third of them
    reached, and the job run again for the same request runs only the rest:
    every device changed once, the result whole."""
    variables, log, topics = installation
    server = fleet(30)
    ids = server.simulator.device_ids()
    request = new_request("config-push", devices=ids, params=PUSH, rollout={"rate_per_minute": 600})
    event = _event_file(tmp_path, request)

    first = _start(env, event, **variables)
    _wait_for(lambda: len(_touched(server, ids)) >= 12, 60, "a third of the devices")
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    reached = len(_touched(server, ids))
    assert reached < len(ids), "the job ended before its kill"
    assert not env.result_events(), "a killed job delivered a result"

    again = _start(env, event, **variables)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "going on after an earlier coordinator" in err, err
    [result] = env.result_events()
    devices = result["data"]["devices"]  # type: ignore[index]
    assert sorted(d["device_id"] for d in devices) == sorted(ids)
    assert {d["status"] for d in devices} == {"succeeded"}
    for device in ids:
        assert len(server.simulator.records(device)["log"]) == 1, device
    # Its progress is in the results topic, as `mayfly get` reads it.
    kinds = {e.event_type for e in _events(log, topics.results, request.root_id)}  # type: ignore[attr-defined]
    assert "dev.mayfly.task.progress" in kinds, kinds


def test_a_cancel_on_the_control_topic_stops_a_running_job(
    env: Env, fleet: FleetFactory, installation, tmp_path: Path
) -> None:
    """`mayfly cancel` publishes on the control topic; a job-mode coordinator
    running the request hears of it within a few seconds and ends canceled,
    the devices not started skipped."""
    variables, log, topics = installation
    server = fleet(20)
    ids = server.simulator.device_ids()
    request = new_request("config-push", devices=ids, params=PUSH, rollout={"rate_per_minute": 60})
    job = _start(env, _event_file(tmp_path, request), **variables)
    _wait_for(lambda: len(_touched(server, ids)) >= 2, 60, "the first devices")
    canceled_at = time.monotonic()
    EventLogSink(log, topics).emit(TaskCancel.of(request.id, 0.0, "wrong config"))
    _, err = job.communicate(timeout=60)
    took = time.monotonic() - canceled_at
    assert job.returncode == 4, err
    assert took < 10, took  # at 60 a minute, the 18 other devices take 18 s
    [result] = env.result_events()
    data = result["data"]
    assert data["status"] == "canceled"  # type: ignore[index]
    statuses = [d["status"] for d in data["devices"]]  # type: ignore[index]
    assert statuses.count("skipped") >= 10, statuses
    assert len(_touched(server, ids)) < 10


def test_a_shard_that_aborts_stops_its_sibling_shard_in_job_mode(
    env: Env, fleet: FleetFactory, installation, tmp_path: Path
) -> None:
    """A request in two shards of 20 at a shared pace, each shard run by a job of
    its own; one shard's devices are all broken. It aborts and publishes the
    abort on the control topic; the other shard, half a minute of work at its
    pace, stops within seconds, aborted too, and publishes the rollback of the
    devices it changed."""
    variables, log, topics = installation
    server = fleet(40, broken=[f"sim-{n:04d}" for n in range(1, 21)])
    ids = server.simulator.device_ids()
    request = new_request(
        "config-push",
        devices=ids,
        params=PUSH,
        rollout={
            "rate_per_minute": 80,
            "abort": {"outcome": "failed", "threshold_pct": 10, "min_devices": 3},
            "on_abort": {"task": "config-push", "params": {"config": {"telemetry_interval_s": 5}}},
        },
    )
    shard_vars = variables | {
        "MAYFLY_SHARD_SIZE": "20",
        "MAYFLY_SHARD_SINK": variables["MAYFLY_EVENT_LOG"],
    }
    cut = _start(env, _event_file(tmp_path, request), **shard_vars)
    _, err = cut.communicate(timeout=60)
    assert cut.returncode == 0, err
    assert "published as 2 shards" in err, err
    lane = topics.lane("normal")
    shards = _requests_on(log, lane)
    assert len(shards) == 2, shards
    broken = set(server.simulator.broken_ids)
    [bad] = [s for s in shards if set(s.devices) <= broken]
    [good] = [s for s in shards if not set(s.devices) & broken]

    sibling = _start(env, _event_file(tmp_path, good), **shard_vars)
    started = time.monotonic()
    aborting = _start(env, _event_file(tmp_path, bad), **shard_vars)
    _, bad_err = aborting.communicate(timeout=120)
    assert "its other shards are stopped" in bad_err, bad_err
    _, good_err = sibling.communicate(timeout=120)
    took = time.monotonic() - started
    assert took < 25, took  # its 20 devices at 40 a minute take 30 s
    results = {e["data"]["request_id"]: e["data"] for e in env.result_events()}  # type: ignore[index]
    stopped = results[good.id]
    assert "aborted" in stopped["aborted"], stopped  # type: ignore[operator]
    changed = sorted(d["device_id"] for d in stopped["devices"] if d["status"] == "succeeded")  # type: ignore[index]
    assert 0 < len(changed) < 20, good_err
    # The rollback of what it changed is on the lane, as its own request.
    rollbacks = [e for e in _requests_on(log, lane) if e.id not in {s.id for s in shards}]
    undone = sorted(d for r in rollbacks for d in r.devices if d in changed)
    assert undone == changed, (rollbacks, changed)
