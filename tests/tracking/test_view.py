"""The request view folded from the log's events, in the orders a log can give them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mayfly.errors import PackageNotFoundError
from mayfly.events import (
    DeviceStatus,
    DeviceUpdate,
    TaskProgress,
    TaskRequest,
    new_request,
    rejection_for,
    shard_request,
    split_completed,
)
from mayfly.tracking import RequestBook, RequestState
from tests.aggregator.conftest import TRACE_ID, Telemetered, device, rejection, result

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _request(request_id: str, *, task: str = "reboot", at: datetime = T0) -> TaskRequest:
    request = new_request(task, devices=["sim-0001", "sim-0002"], request_id=request_id)
    return request.model_copy(update={"time": at})


def test_a_published_request_is_pending_until_its_outcome_is_read() -> None:
    book = RequestBook()
    book.add(_request("r1"))
    view = book.get("r1")
    assert view is not None
    assert view.state == RequestState.PENDING
    assert view.device_total == 2

    book.add(result("r1", devices=[device("sim-0001"), device("sim-0002", "failed")]))

    assert view.state == RequestState.PARTIAL
    assert view.device_counts == {"succeeded": 1, "failed": 1}
    assert view.version == "1.2.0"


def test_a_result_in_parts_is_whole_only_with_every_part_and_counts_once() -> None:
    whole = result("r1", devices=[device(f"sim-{i:04d}") for i in range(300)])
    parts = split_completed(whole, max_event_bytes=20_000)
    assert len(parts) > 2
    book = RequestBook()
    for part in parts[:-1]:
        book.add(part)
    view = book.get("r1")
    assert view is not None
    assert view.state == RequestState.PENDING

    book.add(parts[-1])
    book.add(parts[0])  # a redelivery once whole

    assert view.state == RequestState.SUCCEEDED
    assert len(view.devices) == 300
    assert view.device_counts == {"succeeded": 300}


def test_shards_are_one_request_and_a_rejected_shard_rejects_it() -> None:
    request = new_request("reboot", devices=["a", "b", "c"], request_id="big")
    shards = shard_request(request, ["a", "b", "c"], 1, version="1.0.0")
    book = RequestBook()
    book.add(request)
    for shard in shards:
        book.add(shard)
    done = result(shards[0].id, devices=[device("a")])
    book.add(done.model_copy(update={"shard": shards[0].shard}))
    view = book.get("big")
    assert view is not None
    assert (view.shards, view.shards_done, view.state) == (3, 1, RequestState.PENDING)
    assert list(book.ids()) == ["big"]  # the shards are not requests of their own

    book.add(
        rejection_for(
            PackageNotFoundError("no such package", package="reboot"),
            {"id": shards[2].id, "tasktype": "reboot"},
        )
    )

    assert view.state == RequestState.REJECTED


def test_a_list_without_devices_keeps_the_counts() -> None:
    book = RequestBook(keep_devices=False)
    book.add(result("r1", devices=[device("a"), device("b", "timed_out")]))
    view = book.get("r1")
    assert view is not None
    assert view.devices == ()
    assert view.device_counts == {"succeeded": 1, DeviceStatus.TIMED_OUT.value: 1}
    assert view.device_total == 2


def test_only_keeps_the_requests_asked_for() -> None:
    book = RequestBook(only=["r2"])
    for rid in ("r1", "r2", "r3"):
        book.add(_request(rid))
        book.add(result(rid))
    assert list(book.ids()) == ["r2"]


def test_views_filter_and_come_newest_first() -> None:
    book = RequestBook()
    book.add(_request("old", at=T0))
    book.add(_request("new", at=T0 + timedelta(hours=2)))
    book.add(_request("push", task="config-push", at=T0 + timedelta(hours=1)))
    book.add(result("old"))
    book.add(rejection("push", task="config-push"))

    assert [v.id for v in book.views()] == ["new", "push", "old"]
    assert [v.id for v in book.views(task="config-push")] == ["push"]
    assert [v.id for v in book.views(states=[RequestState.PENDING])] == ["new"]
    assert [v.id for v in book.views(since=T0 + timedelta(minutes=30))] == ["new", "push"]


def test_the_trace_id_is_the_trace_the_aggregator_makes(telemetered: Telemetered) -> None:
    continued = result("r1")  # the publisher's traceparent
    derived = result("r2", traceparent=None)
    refused = rejection("r3").model_copy(update={"traceparent": None})
    book = RequestBook()
    for event in (continued, derived, refused):
        book.add(event)
        telemetered.aggregator.handle(event)

    traced = {format(s.context.trace_id, "032x") for s in telemetered.spans()}

    views = [book.get(rid) for rid in ("r1", "r2", "r3")]
    ids = [v.trace_id for v in views if v is not None]
    assert ids[0] == TRACE_ID
    assert len(set(ids)) == 3
    assert set(ids) == traced


def _report(request_id: str, seq: int, counts: dict[str, int], **kw: object) -> TaskProgress:
    return TaskProgress(
        request_id=request_id,
        task="reboot",
        coordinator="coord-1",
        seq=seq,
        started_at=T0,
        devices_total=sum(counts.values()),
        counts={DeviceStatus(s): n for s, n in counts.items()},
        **kw,
    )


def test_progress_makes_a_request_running_until_its_outcome() -> None:
    book = RequestBook()
    book.add(_request("r1"))
    book.add(
        _report(
            "r1",
            0,
            {"running": 1, "queued": 1},
            devices=(DeviceUpdate(device_id="sim-0001", status="running", percent=50.0),),
        )
    )
    view = book.get("r1")
    assert view is not None
    assert view.state == RequestState.RUNNING
    assert view.running_counts == {"running": 1, "queued": 1}
    assert view.live["sim-0001"].percent == 50.0

    book.add(result("r1"))
    book.add(_report("r1", 1, {"running": 2}))  # late news of a run again: the outcome stands

    assert view.state == RequestState.SUCCEEDED
    assert view.live == {}
    assert "progress" not in view.to_dict()


def test_the_progress_of_shards_adds_up() -> None:
    request = new_request("reboot", devices=["a", "b", "c", "d"], request_id="big")
    shards = shard_request(request, ["a", "b", "c", "d"], 2, version="1.0.0")
    book = RequestBook()
    book.add(request)
    book.add(_report(shards[0].id, 3, {"succeeded": 1, "running": 1}, shard=shards[0].shard))
    book.add(_report(shards[1].id, 0, {"queued": 2}, shard=shards[1].shard))
    book.add(_report(shards[0].id, 4, {"succeeded": 2}, shard=shards[0].shard))

    view = book.get("big")
    assert view is not None
    assert view.running_counts == {"succeeded": 2, "queued": 2}
