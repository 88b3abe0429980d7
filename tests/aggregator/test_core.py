"""The aggregator as Jaeger and a consumer loop see it: traces, parts, duplicates, metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from mayfly.aggregator import Aggregator, LocalResultArchive, Outcome
from mayfly.aggregator.ingest import Ingest
from mayfly.errors import StoreError
from mayfly.eventlog import LogRecord
from mayfly.events import (
    STRUCTURED_CONTENT_TYPE,
    OverallStatus,
    Shard,
    TaskCompleted,
    from_http,
    split_completed,
    to_kafka_record,
)

from .conftest import (
    DATA,
    PUBLISHER_SPAN_ID,
    T0,
    TRACE_ID,
    Telemetered,
    device,
    rejection,
    result,
)


def _ns(moment: object) -> int:
    from datetime import datetime

    assert isinstance(moment, datetime)
    return round(moment.timestamp() * 1_000_000) * 1000


def _root(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    [root] = [s for s in spans if s.kind is SpanKind.CONSUMER]
    return root


def _task(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    [task] = [s for s in spans if s.name.startswith("task ")]
    return task


def _golden() -> TaskCompleted:
    event = from_http(
        {"content-type": STRUCTURED_CONTENT_TYPE}, (DATA / "completed.json").read_bytes()
    )
    assert isinstance(event, TaskCompleted)
    return event


def test_one_request_is_one_trace_continuing_the_publisher(telemetered: Telemetered) -> None:
    golden = _golden()
    assert telemetered.aggregator.handle(golden) is Outcome.PROCESSED
    spans = telemetered.spans()
    root = _root(spans)
    task = _task(spans)
    children = [s for s in spans if s is not root and s is not task]

    assert len(spans) == 2 + len(golden.devices)
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    assert root.parent is not None
    assert root.parent.span_id == int(PUBLISHER_SPAN_ID, 16)
    assert root.parent.is_remote
    # The coordinator's processing of the request, named as the messaging
    # conventions say; the run under it; the devices under the run.
    assert root.name == "process mayfly.requests.high"
    assert task.name == "task firmware-update"
    assert task.parent is not None
    assert task.parent.span_id == root.context.span_id
    assert all(c.parent is not None and c.parent.span_id == task.context.span_id for c in children)
    assert sorted(c.name for c in children) == [f"device {d.device_id}" for d in golden.devices]

    # Real timestamps: receipt to finish for the root, the run from its start,
    # each device's own times.
    timings = golden.timings
    assert root.start_time == _ns(timings.received_at)
    assert root.end_time == _ns(timings.finished_at)
    assert task.start_time == _ns(timings.started_at)
    assert task.end_time == root.end_time
    by_id = {c.attributes["mayfly.device.id"]: c for c in children if c.attributes}
    ok, late, skipped = (by_id[d.device_id] for d in golden.devices)
    assert ok.start_time == _ns(golden.devices[0].started_at)
    assert ok.end_time == _ns(golden.devices[0].finished_at)
    assert late.end_time == _ns(golden.devices[1].finished_at)
    # Never started: a zero-length span at the run's start.
    assert skipped.start_time == skipped.end_time == _ns(timings.started_at)

    assert ok.status.status_code is StatusCode.OK
    assert late.status.status_code is StatusCode.ERROR
    assert late.status.description == "no answer within 3s"
    assert skipped.status.status_code is StatusCode.UNSET
    for parent in (root, task):
        assert parent.status.status_code is StatusCode.ERROR  # the request was only partial
        assert "sensor-0002: no answer within 3s" in (parent.status.description or "")
        assert parent.attributes is not None
        assert parent.attributes["error.type"] == "partial"

    assert root.attributes is not None
    attributes = dict(root.attributes)
    # The request's message, as the coordinator consumed it from its lane.
    assert attributes == attributes | {
        "cloudevents.event_id": golden.request_id,
        "cloudevents.event_type": "dev.mayfly.task.requested",
        "cloudevents.event_source": golden.request_source,
        "cloudevents.event_spec_version": "1.0",
        "messaging.system": "sqlite",
        "messaging.destination.name": "mayfly.requests.high",
        "messaging.consumer.group.name": "mayfly-dispatcher",
        "messaging.message.id": golden.request_id,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "mayfly.task": "firmware-update",
        "mayfly.request.id": golden.request_id,
        "mayfly.cold_start_ms": 8.5,
    }
    assert task.attributes is not None
    assert dict(task.attributes) == {
        "mayfly.task": "firmware-update",
        "mayfly.request.id": golden.request_id,
        "mayfly.package.version": "2.4.1",
        "mayfly.package.digest": golden.package.digest,
        "mayfly.request.status": "partial",
        "mayfly.device.count": 3,
        "mayfly.coordinator.id": "coord-7f3a",
        "mayfly.coordinator.mode": "local",
        "error.type": "partial",
    }
    assert late.attributes is not None
    assert late.attributes["error.type"] == "timed_out"
    assert late.attributes["mayfly.device.status"] == "timed_out"
    assert late.attributes["mayfly.device.attempts"] == 3


def test_a_succeeded_request_has_an_ok_root(telemetered: Telemetered) -> None:
    # From another installation's results topic: its lanes and group are named.
    telemetered.aggregator.handle(result(), destination="eu.results")
    root = _root(telemetered.spans())
    assert root.status.status_code is StatusCode.OK
    assert root.attributes is not None
    assert "error.type" not in root.attributes
    assert root.attributes["messaging.destination.name"] == "eu.requests.normal"
    assert root.attributes["messaging.consumer.group.name"] == "eu-dispatcher"


def test_without_a_traceparent_the_request_starts_its_own_trace(
    telemetered: Telemetered,
) -> None:
    telemetered.aggregator.handle(result(traceparent=None))
    spans = telemetered.spans()
    root = _root(spans)
    assert root.parent is None
    assert root.context.trace_id != int(TRACE_ID, 16)
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}


def test_parts_make_one_trace_once_all_have_arrived(telemetered: Telemetered) -> None:
    whole = result(devices=[device(f"sim-{i:04d}", start=i / 10) for i in range(40)])
    parts = split_completed(whole, max_event_bytes=2_000)
    assert len(parts) >= 3
    aggregator = telemetered.aggregator

    # Out of order, with a redelivered part in the middle.
    outcomes = [aggregator.handle(parts[-1]), aggregator.handle(parts[-1])]
    for part in parts[:-2]:
        outcomes.append(aggregator.handle(part))
    assert telemetered.spans() == ()
    assert aggregator.pending == 1
    outcomes.append(aggregator.handle(parts[-2]))
    assert outcomes[0] is Outcome.PENDING
    assert outcomes[1] is Outcome.DUPLICATE
    assert outcomes[-1] is Outcome.PROCESSED

    spans = telemetered.spans()
    assert len(spans) == 42
    assert len({s.context.trace_id for s in spans}) == 1
    assert aggregator.pending == 0
    # Late redeliveries of any part, or of the whole, change nothing.
    assert aggregator.handle(parts[0]) is Outcome.DUPLICATE
    assert aggregator.handle(whole) is Outcome.DUPLICATE
    assert len(telemetered.spans()) == 42
    [archived] = list(telemetered.archive.read())
    assert archived == whole


def test_a_batch_archives_once_and_skips_its_own_duplicates(telemetered: Telemetered) -> None:
    first, second = result("req-1"), result("req-2")
    outcomes = telemetered.aggregator.handle_many([first, second, first, rejection()])
    assert outcomes == [
        Outcome.PROCESSED,
        Outcome.PROCESSED,
        Outcome.DUPLICATE,
        Outcome.PROCESSED,
    ]
    assert len([s for s in telemetered.spans() if s.kind is SpanKind.CONSUMER]) == 3
    assert len(list(telemetered.archive.read())) == 3


def test_one_id_from_two_sources_is_two_requests_each_archived_and_traced(
    telemetered: Telemetered,
) -> None:
    ours = result("req-1").model_copy(update={"request_source": "/site-a"})
    theirs = result("req-1").model_copy(update={"request_source": "/site-b"})
    outcomes = telemetered.aggregator.handle_many([ours, theirs, theirs])
    assert outcomes == [Outcome.PROCESSED, Outcome.PROCESSED, Outcome.DUPLICATE]
    archived = list(telemetered.archive.read())
    assert sorted(e.request_source for e in archived) == ["/site-a", "/site-b"]  # type: ignore[union-attr]


def test_parts_of_two_runs_of_one_request_are_not_mixed(telemetered: Telemetered) -> None:
    devices = [device(f"sim-{i:04d}") for i in range(20)]
    run_a = split_completed(result(devices=devices, coordinator="coord-a"), 1_500)
    run_b = split_completed(result(devices=devices, coordinator="coord-b", queued=1.0), 1_500)
    aggregator = telemetered.aggregator
    assert aggregator.handle(run_a[0]) is Outcome.PENDING
    for part in run_b:
        aggregator.handle(part)
    task = _task(telemetered.spans())
    assert task.attributes is not None
    assert task.attributes["mayfly.coordinator.id"] == "coord-b"
    assert aggregator.handle(run_a[1]) is Outcome.DUPLICATE


def test_contradicting_parts_are_invalid_and_dropped(telemetered: Telemetered) -> None:
    parts = split_completed(result(devices=[device(f"sim-{i:04d}") for i in range(20)]), 1_500)
    last = parts[-1]
    forged = last.model_copy(
        update={"package": last.package.model_copy(update={"version": "9.9.9"})}
    )
    aggregator = telemetered.aggregator
    for part in parts[:-1]:
        assert aggregator.handle(part) is Outcome.PENDING
    assert aggregator.handle(forged) is Outcome.INVALID
    assert aggregator.pending == 0
    assert telemetered.spans() == ()
    assert list(telemetered.archive.read()) == []


def test_a_rejection_is_one_error_span(telemetered: Telemetered) -> None:
    rejected = rejection()
    assert telemetered.aggregator.handle(rejected) is Outcome.PROCESSED
    assert telemetered.aggregator.handle(rejected) is Outcome.DUPLICATE
    [span] = telemetered.spans()
    assert span.name == f"process mayfly.requests.{rejected.priority.value}"
    assert span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None
    assert span.parent.span_id == int(PUBLISHER_SPAN_ID, 16)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == rejected.reason
    # At the rejection: after the publisher's span, whose start is not known.
    assert span.start_time == span.end_time == _ns(rejected.time)
    assert span.attributes is not None
    assert span.attributes["mayfly.rejection.code"] == "unknown_task"
    assert span.attributes["error.type"] == "unknown_task"
    assert span.attributes["messaging.message.id"] == rejected.request_id
    assert span.attributes["cloudevents.event_type"] == "dev.mayfly.task.requested"
    assert span.attributes["mayfly.request.status"] == "rejected"


def _points(telemetered: Telemetered, name: str) -> dict[tuple[tuple[str, object], ...], object]:
    metric = telemetered.metric(name)
    return {
        tuple(sorted((point.attributes or {}).items())): point
        for point in metric.data.data_points  # type: ignore[union-attr]
    }


def test_metrics_count_requests_and_device_executions_by_status(
    telemetered: Telemetered,
) -> None:
    aggregator = telemetered.aggregator
    aggregator.handle(result("r1"))
    aggregator.handle(result("r2", devices=[device("sim-0001"), device("sim-0002", "failed")]))
    aggregator.handle(result("r3", devices=[device("sim-0001", "failed", error="boom")]))
    aggregator.handle(result("r3"))  # duplicate: not counted
    aggregator.handle(rejection())

    requests = {
        key: point.value  # type: ignore[attr-defined]
        for key, point in _points(telemetered, "mayfly.task.requests").items()
    }
    assert requests == {
        (("mayfly.request.status", "succeeded"), ("mayfly.task", "reboot")): 1,
        (("mayfly.request.status", "partial"), ("mayfly.task", "reboot")): 1,
        (("mayfly.request.status", "failed"), ("mayfly.task", "reboot")): 1,
        (
            ("mayfly.rejection.code", "unknown_task"),
            ("mayfly.request.status", "rejected"),
            ("mayfly.task", "firmware-updater"),
        ): 1,
    }
    executions = {
        key: point.value  # type: ignore[attr-defined]
        for key, point in _points(telemetered, "mayfly.device.executions").items()
    }
    assert (
        executions[
            (
                ("mayfly.device.id", "sim-0001"),
                ("mayfly.device.status", "succeeded"),
                ("mayfly.task", "reboot"),
            )
        ]
        == 2
    )
    assert (
        executions[
            (
                ("mayfly.device.id", "sim-0001"),
                ("mayfly.device.status", "failed"),
                ("mayfly.task", "reboot"),
            )
        ]
        == 1
    )
    assert sum(executions.values()) == 5  # type: ignore[arg-type]

    durations = _points(telemetered, "mayfly.task.duration")
    succeeded = durations[(("mayfly.request.status", "succeeded"), ("mayfly.task", "reboot"))]
    assert succeeded.count == 1  # type: ignore[attr-defined]
    assert succeeded.sum == pytest.approx(3.0)  # type: ignore[attr-defined]
    device_durations = _points(telemetered, "mayfly.device.duration")
    ok = device_durations[(("mayfly.device.status", "succeeded"), ("mayfly.task", "reboot"))]
    assert ok.count == 3  # type: ignore[attr-defined]
    assert ok.sum == pytest.approx(1.5)  # type: ignore[attr-defined]


class _FailingArchive:
    def __init__(self) -> None:
        self.fail = True
        self.archived: list[object] = []

    def describe(self) -> str:
        return "flaky"

    def append(self, events: Sequence[object]) -> None:
        if self.fail:
            raise StoreError("disk full")
        self.archived.extend(events)

    def read(self, **_: object) -> list[object]:
        return self.archived


def test_an_archive_failure_leaves_the_batch_unprocessed_for_redelivery(
    telemetered: Telemetered,
) -> None:
    archive = _FailingArchive()
    aggregator = Aggregator(
        telemetered.telemetry.tracer(),
        telemetered.telemetry.meter(),
        archive,  # type: ignore[arg-type]
    )
    parts = split_completed(result(devices=[device(f"sim-{i:04d}") for i in range(20)]), 1_500)
    for part in parts[:-1]:
        aggregator.handle(part)
    with pytest.raises(StoreError):
        aggregator.handle(parts[-1])
    assert telemetered.spans() == ()
    archive.fail = False
    # The consumer redelivers from its last commit: the parts are taken again.
    outcomes = aggregator.handle_many(parts)
    assert Outcome.PROCESSED in outcomes
    assert len(archive.archived) == 1
    assert len(telemetered.spans()) == 22


def test_processed_ids_are_remembered_within_a_bound(telemetered: Telemetered) -> None:
    telemetry = telemetered.telemetry
    aggregator = Aggregator(telemetry.tracer(), telemetry.meter(), None, max_remembered=2)
    for name in ("r1", "r2", "r3"):
        aggregator.handle(result(name))
    assert aggregator.handle(result("r3")) is Outcome.DUPLICATE
    assert aggregator.handle(result("r1")) is Outcome.PROCESSED  # forgotten: oldest first


def _shards(count: int, per_shard: int, **kwargs: object) -> list[TaskCompleted]:
    """The results of ``count`` shards of request req-big, ``per_shard`` devices each."""
    shards = []
    for index in range(count):
        devices = [device(f"sim-{index * per_shard + i:04d}") for i in range(per_shard)]
        one = result(
            f"req-big#shard-{index}",
            devices=devices,
            coordinator=f"coord-{index}",
            queued=0.5 + index / 10,
            **kwargs,  # type: ignore[arg-type]
        )
        shards.append(
            one.model_copy(update={"shard": Shard(of="req-big", index=index, count=count)})
        )
    return shards


def test_shards_make_one_result_and_one_trace_once_all_are_in(telemetered: Telemetered) -> None:
    shards = _shards(3, 4)
    aggregator = telemetered.aggregator
    # Out of order; the middle one is split into parts and one shard comes twice.
    parts = split_completed(shards[1], max_event_bytes=1_200)
    assert len(parts) > 1
    outcomes = [aggregator.handle(shards[2]), aggregator.handle(shards[2])]
    outcomes += [aggregator.handle(part) for part in parts]
    assert outcomes[:2] == [Outcome.PENDING, Outcome.DUPLICATE]
    assert telemetered.spans() == ()
    assert aggregator.pending == 1
    assert aggregator.handle(shards[0]) is Outcome.PROCESSED
    assert aggregator.pending == 0

    [merged] = list(telemetered.archive.read())
    assert isinstance(merged, TaskCompleted)
    assert merged.request_id == "req-big"
    assert merged.shard is None
    assert [d.device_id for d in merged.devices] == [f"sim-{i:04d}" for i in range(12)]
    assert [(r.index, r.devices, r.coordinator.id) for r in merged.shards] == [
        (0, 4, "coord-0"),
        (1, 4, "coord-1"),
        (2, 4, "coord-2"),
    ]
    assert merged.timings.received_at == shards[0].timings.received_at

    spans = telemetered.spans()
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}
    task = _task(spans)
    shard_spans = [s for s in spans if s.name.startswith("shard ")]
    assert sorted(s.name for s in shard_spans) == ["shard 1/3", "shard 2/3", "shard 3/3"]
    assert all(s.parent and s.parent.span_id == task.context.span_id for s in shard_spans)
    by_span = {s.context.span_id: s for s in shard_spans}
    devices = [s for s in spans if s.name.startswith("device ")]
    assert len(devices) == 12
    for span in devices:
        assert span.parent is not None
        shard = by_span[span.parent.span_id]
        assert shard.attributes is not None
        assert span.attributes is not None
        index = int(str(span.attributes["mayfly.device.id"])[4:]) // 4
        assert shard.attributes["mayfly.coordinator.id"] == f"coord-{index}"
    # A shard redelivered after the merge changes nothing.
    assert aggregator.handle(shards[1]) is Outcome.DUPLICATE
    assert len(telemetered.spans()) == len(spans)


def test_a_failed_shard_makes_the_request_partial(telemetered: Telemetered) -> None:
    shards = _shards(2, 2)
    failed = [device("sim-0002", "failed", error="boom"), device("sim-0003", "failed")]
    shards[1] = shards[1].model_copy(update={"devices": tuple(failed), "status": "failed"})
    telemetered.aggregator.handle_many(shards)
    [merged] = list(telemetered.archive.read())
    assert isinstance(merged, TaskCompleted)
    assert merged.status is OverallStatus.PARTIAL
    root = _root(telemetered.spans())
    assert root.status.status_code is StatusCode.ERROR
    assert "2 of 4 device(s) failed; sim-0002: boom" in (root.status.description or "")


def test_shards_that_disagree_on_the_package_are_invalid(telemetered: Telemetered) -> None:
    shards = _shards(2, 2)
    shards[1] = shards[1].model_copy(
        update={"package": shards[1].package.model_copy(update={"version": "9.9.9"})}
    )
    assert telemetered.aggregator.handle_many(shards) == [Outcome.PENDING, Outcome.INVALID]
    assert telemetered.aggregator.pending == 0
    assert list(telemetered.archive.read()) == []


def test_after_a_restart_a_redelivered_batch_is_archived_once_and_traced_the_same(
    telemetered: Telemetered,
) -> None:
    batch = [result("r1"), result("r2", traceparent=None), rejection("r3")]
    telemetered.aggregator.handle_many(batch)
    first = {(s.context.trace_id, s.context.span_id, s.name) for s in telemetered.spans()}
    telemetered.exporter.clear()
    counted = _points(telemetered, "mayfly.task.requests")

    # A new process on the same archive, the commit lost: the batch comes again.
    telemetry = telemetered.telemetry
    restarted = Aggregator(
        telemetry.tracer("test"),
        telemetry.meter("test"),
        LocalResultArchive(telemetered.archive.root),
    )
    assert restarted.handle_many(batch) == [Outcome.PROCESSED] * 3
    again = {(s.context.trace_id, s.context.span_id, s.name) for s in telemetered.spans()}

    assert sorted(e.id for e in telemetered.archive.read()) == sorted(e.id for e in batch)
    lines = [
        ln for f in telemetered.archive.root.glob("*.jsonl") for ln in f.read_text().splitlines()
    ]
    assert len(lines) == 3  # the readers list each once anyway: no second record either
    # The very same spans: one trace per request, whether the first ones left or not.
    assert again == first
    assert {k: p.value for k, p in _points(telemetered, "mayfly.task.requests").items()} == {  # type: ignore[attr-defined]
        k: p.value  # type: ignore[attr-defined]
        for k, p in counted.items()
    }
    # Something new after it is archived and counted as ever.
    assert restarted.handle(result("r4")) is Outcome.PROCESSED
    assert len(list(telemetered.archive.read())) == 4


def _records(
    events: Sequence[TaskCompleted], partition: int = 1, first: int = 100
) -> list[LogRecord]:
    records = []
    for offset, event in enumerate(events, start=first):
        key, value, headers = to_kafka_record(event)
        records.append(LogRecord("mayfly.results", partition, offset, key, value, tuple(headers)))
    return records


def test_no_commit_passes_a_buffered_shard_and_a_restart_merges_it_once(
    telemetered: Telemetered,
) -> None:
    shards = _shards(3, 2)
    records = _records([shards[0], result("r-other"), shards[1]])
    ingest = Ingest(telemetered.aggregator)
    read = ingest.records(records)
    assert read == {1: 103}
    # The shards at 100 and 102 are in memory only: nothing past 100 is committed.
    assert ingest.committable(read) == {1: 100}

    # Killed there: a new process reads again from 100, then the last shard comes.
    restarted = Ingest(
        Aggregator(
            telemetered.telemetry.tracer("test"),
            telemetered.telemetry.meter("test"),
            LocalResultArchive(telemetered.archive.root),
        )
    )
    again = restarted.records([*records, *_records([shards[2]], first=103)])
    assert restarted.committable(again) == {1: 104}
    archived = Counter(e.request_id for e in telemetered.archive.read())
    assert archived == {"r-other": 1, "req-big": 1}
    files = telemetered.archive.root.glob("*.jsonl")
    assert len([line for f in files for line in f.read_text().splitlines()]) == 2


def test_a_buffered_part_holds_its_partition_until_its_result_is_archived(
    telemetered: Telemetered,
) -> None:
    parts = split_completed(result(devices=[device(f"sim-{i:04d}") for i in range(20)]), 1_500)
    assert len(parts) >= 2
    ingest = Ingest(telemetered.aggregator)
    assert ingest.committable(ingest.records(_records(parts[:1], partition=2, first=7))) == {2: 7}
    rest = _records(parts[1:], partition=2, first=8)
    assert ingest.committable(ingest.records(rest)) == {2: 8 + len(rest)}
    assert telemetered.aggregator.held_offsets() == {}


def test_a_shard_that_disagrees_on_the_count_is_dropped_not_its_siblings(
    telemetered: Telemetered,
) -> None:
    shards = _shards(2, 2)
    odd = shards[0].model_copy(update={"shard": Shard(of="req-big", index=0, count=5)})
    aggregator = telemetered.aggregator
    assert aggregator.handle_many([shards[0], odd]) == [Outcome.PENDING, Outcome.INVALID]
    assert aggregator.handle(shards[1]) is Outcome.PROCESSED
    [merged] = list(telemetered.archive.read())
    assert len(merged.devices) == 4  # type: ignore[union-attr]


def test_waiting_shards_are_bounded_by_their_device_results(telemetered: Telemetered) -> None:
    telemetry = telemetered.telemetry
    aggregator = Aggregator(telemetry.tracer(), telemetry.meter(), None, max_pending_devices=5)
    first = _shards(3, 2)[0]
    second = first.model_copy(
        update={"request_id": "req-2#shard-0", "shard": Shard(of="req-2", index=0, count=3)}
    )
    third = first.model_copy(
        update={"request_id": "req-3#shard-0", "shard": Shard(of="req-3", index=0, count=3)}
    )
    for shard in (first, second, third):
        assert aggregator.handle(shard) is Outcome.PENDING
    assert aggregator.pending == 2  # the oldest request was given up: 6 results > 5


def test_a_result_older_than_what_was_recalled_recalls_further_back(
    telemetered: Telemetered,
) -> None:
    late = result("r-late", at=T0 - timedelta(hours=2))
    telemetered.aggregator.handle_many([late, result("r-now")])
    restarted = Aggregator(
        telemetered.telemetry.tracer("test"),
        telemetered.telemetry.meter("test"),
        LocalResultArchive(telemetered.archive.root),
    )
    restarted.handle(result("r-now"))  # recalls from 10 minutes before now's
    restarted.handle(late)  # two hours before: recalled too, not archived again
    files = telemetered.archive.root.glob("*.jsonl")
    assert len([line for f in files for line in f.read_text().splitlines()]) == 2
