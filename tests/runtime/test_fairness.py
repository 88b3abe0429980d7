"""Fair shares of the coordinators between task types inside a lane: a rollout
of many requests of one type takes its share, and a request of another type
queued behind them starts at the next free slot, not after all of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mayfly.app.local import Runtime
from mayfly.app.publishing import publish_folder
from mayfly.events import TaskCompleted, new_request

from .conftest import Home
from .test_serving import _publish, _serve, _started


def _slow_package(home: Home, tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    manifest = {"name": name, "version": "1.0.0", "entrypoint": f"{name}:run"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / f"{name}.py").write_text(
        "import time\n\ndef run(ctx):\n    time.sleep(0.3)\n    return 'ok'\n"
    )
    publish_folder(home.settings(), folder)


def _order(
    home: Home, tmp_path: Path, fleet, urgent: int, slots: int, **settings: str
) -> list[str]:
    """The task types in the order their requests started: 12 of ``bulk``
    published, then ``urgent`` of ``urgent``, ``slots`` coordinators at once."""
    fleet(1)
    for name in ("bulk", "urgent"):
        _slow_package(home, tmp_path, name)
    requests = [new_request("bulk", devices=["sim-0001"], partition_key=f"b{i}") for i in range(12)]
    requests += [
        new_request("urgent", devices=["sim-0001"], partition_key=f"u{i}") for i in range(urgent)
    ]
    _publish(home, requests)
    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS=str(slots), **settings))
    started = _started(_serve(runtime, len(requests)))
    assert all(isinstance(r, TaskCompleted) for r in home.results().values())
    return [str(info["task"]) for info in started]


def test_a_request_of_another_type_starts_before_a_backlog_ahead_of_it(
    home: Home, tmp_path: Path, fleet
) -> None:
    order = _order(home, tmp_path, fleet, urgent=1, slots=2)
    # One slot to each type: urgent does not wait for the 12 bulk requests.
    assert order[:2] == ["bulk", "urgent"], order


def test_types_share_the_slots_by_their_weights(home: Home, tmp_path: Path, fleet) -> None:
    even = _order(home, tmp_path, fleet, urgent=12, slots=4)
    assert even[:4].count("bulk") == 2, even


def test_a_heavier_type_takes_more_of_the_slots(home: Home, tmp_path: Path, fleet) -> None:
    weighted = _order(home, tmp_path, fleet, urgent=12, slots=4, MAYFLY_TASK_WEIGHTS="bulk=3")
    assert weighted[:4].count("bulk") == 3, weighted


def test_inside_a_type_a_fairness_key_gets_its_share(home: Home, tmp_path: Path, fleet) -> None:
    """Twelve requests of site a, then one of site b, all of one type: site b's
    starts at the first free slot, not after site a's backlog."""
    fleet(1)
    _slow_package(home, tmp_path, "bulk")
    requests = [
        new_request("bulk", devices=["sim-0001"], partition_key=f"a{i}", fairness_key="site-a")
        for i in range(12)
    ]
    requests.append(
        new_request("bulk", devices=["sim-0001"], partition_key="b", fairness_key="site-b")
    )
    _publish(home, requests)
    runtime = Runtime(home.settings(MAYFLY_MAX_COORDINATORS="2"))
    started = [str(info["request_id"]) for info in _started(_serve(runtime, len(requests)))]
    assert started.index(requests[-1].id) == 1, started


def test_a_fairness_key_travels_as_an_attribute_and_is_bounded() -> None:
    from mayfly.errors import EventError
    from mayfly.events import from_kafka, to_kafka_record

    request = new_request("bulk", devices=["d"], fairness_key="tenant:acme/eu-1")
    _, _, headers = to_kafka_record(request)
    assert ("ce_fairnesskey", b"tenant:acme/eu-1") in headers
    assert (
        from_kafka(headers, None, to_kafka_record(request)[1]).fairness_key == request.fairness_key
    )
    for bad in ("", "x" * 129, "a b", "café"):
        with pytest.raises(EventError) as caught:
            new_request("bulk", devices=["d"], fairness_key=bad)
        assert caught.value.field == "fairnesskey"
