"""A request over more devices than the shard size runs in shards, each in a
coordinator of its own, and still reads as one request: one archived result,
one trace, each device acted on once under the request's own keys."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mayfly.aggregator.archive import LocalResultArchive
from mayfly.app.wiring import open_event_log
from mayfly.devices import idempotency_key
from mayfly.devices.sim import SimulatorServer
from mayfly.events import OverallStatus, TaskCompleted, new_request, to_kafka_record
from mayfly.topics import Topics

from .conftest import Home

FleetFactory = Callable[..., SimulatorServer]


def _archived(home: Home, timeout_s: float) -> list[TaskCompleted]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in LocalResultArchive(home.root / "archive").read()]
        if found or time.monotonic() > deadline:
            assert all(isinstance(e, TaskCompleted) for e in found), found
            return found  # type: ignore[return-value]
        time.sleep(0.3)


def _spans(trace_file: Path) -> list[dict[str, Any]]:
    return [
        span
        for line in trace_file.read_text().splitlines()
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]


def _wait_for_spans(trace_file: Path, want: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = _spans(trace_file) if trace_file.exists() else []
        if len(spans) >= want or time.monotonic() > deadline:
            return spans
        time.sleep(0.3)


@pytest.mark.parametrize("log", ["sqlite", pytest.param("kafka", marks=pytest.mark.kafka)])
def test_a_large_request_runs_in_shards_and_reads_as_one(
    home: Home, fleet: FleetFactory, log: str, request: pytest.FixtureRequest
) -> None:
    server = fleet(60)
    devices = server.simulator.device_ids()
    env = {"MAYFLY_SHARD_SIZE": "10"}
    topics = Topics()
    if log == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        topics = Topics(f"mayfly-shards-{uuid.uuid4().hex[:8]}")
        env |= {"MAYFLY_EVENT_LOG": f"kafka://{bootstrap}", "MAYFLY_TOPIC_PREFIX": topics.prefix}
    published = new_request(
        "config-push", devices=devices, params={"config": {"telemetry_interval_s": 9}}
    )
    # What `mayfly plan` says of it, before: the shards it then runs in.
    planned = subprocess.run(
        [sys.executable, "-m", "mayfly.cli", "plan", "config-push", "-o", "json",
         "-p", 'config={"telemetry_interval_s": 9}', *(a for d in devices for a in ("-d", d))],
        env=home.env(**env), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    [plan] = json.loads(planned.stdout)
    assert plan["shards"] == [10] * 6
    assert plan["devices"] == devices
    up = home.up_with("-v", output=home.root / "up.log", **env)
    with open_event_log(home.settings(**env)) as event_log:
        event_log.append(topics.lane(published.priority), *to_kafka_record(published))

    archived = _archived(home, timeout_s=90)
    spans = _wait_for_spans(home.root / "telemetry" / "traces.jsonl", 2 + 6 + 60, 20)
    up.terminate()
    up.wait(timeout=30)
    output = (home.root / "up.log").read_text(errors="replace")
    # Six shards, each a request of its own, with its own coordinator...
    assert output.count("6 shards published") == 1, output[-3000:]
    started = set(re.findall(r"started (\S+#shard-\d+):", output))
    assert started == {f"{published.id}#shard-{i}" for i in range(6)}, output[-3000:]

    # One archived result for the request, every device in it, in order.
    assert len(archived) == 1, archived
    merged = archived[0]
    assert merged.request_id == published.id
    assert merged.shard is None
    assert [d.device_id for d in merged.devices] == devices
    assert merged.status is OverallStatus.SUCCEEDED
    assert [(run.index, run.devices) for run in merged.shards] == [(i, 10) for i in range(6)]
    assert [run.devices for run in merged.shards] == plan["shards"]
    assert merged.package.digest == plan["digest"]
    # ... run at once, not one after another.
    windows = sorted((r.timings.started_at, r.timings.finished_at) for r in merged.shards)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(windows))

    # One trace: the root, the run, a span per shard, each device under its shard's.
    assert len({s["traceId"] for s in spans}) == 1
    names = Counter(s["name"].split(" ")[0] for s in spans)
    assert names == {"process": 1, "task": 1, "shard": 6, "device": 60}, names
    shard_ids = {s["spanId"] for s in spans if s["name"].startswith("shard ")}
    assert all(s["parentSpanId"] in shard_ids for s in spans if s["name"].startswith("device "))

    # The devices acted once each, under the keys of the request as published.
    sim = server.simulator
    assert sim.duplicates() == []
    for device in devices:
        record = sim.records(device)
        key = idempotency_key(published.id, device, "config-push", 0, source=published.source)
        assert [entry["key"] for entry in record["log"]] == [key]
