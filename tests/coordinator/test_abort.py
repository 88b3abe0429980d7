"""A rollout that stops itself: ``rollout.abort`` met, the rest is not touched."""

from __future__ import annotations

import pytest

from mayfly.errors import EventError
from mayfly.events import DeviceStatus, OverallStatus, TaskCompleted, new_request

from .conftest import Env, FleetFactory


def test_an_abort_met_stops_the_rollout_before_most_devices_are_touched(
    env: Env, fleet: FleetFactory
) -> None:
    server = fleet(300, broken=0.3, seed=11)
    ids = server.simulator.device_ids()
    request = new_request(
        "config-push",
        devices=ids,
        params={"config": {"telemetry_interval_s": 99}},
        rollout={
            "max_parallel": 10,
            "abort": {"outcome": "failed", "threshold_pct": 10, "min_devices": 50},
        },
    )
    outcome = env.coordinator().handle(request)

    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.aborted is not None
    assert "abort at 10 % once 50 ran" in outcome.aborted
    assert outcome.status is OverallStatus.PARTIAL
    touched = [d for d in ids if server.simulator.records(d)["last_request_at"] is not None]
    assert 50 <= len(touched) < 100, len(touched)
    by_id = {d.device_id: d for d in outcome.devices}
    skipped = [d for d in by_id.values() if d.status is DeviceStatus.SKIPPED]
    assert len(skipped) == len(ids) - len(touched)
    assert all((d.error or "").startswith("rollout aborted: ") for d in skipped)
    assert all(by_id[d].status is not DeviceStatus.SKIPPED for d in touched)


def test_without_enough_devices_run_the_abort_waits(env: Env, fleet: FleetFactory) -> None:
    fleet(6, broken=["sim-0001", "sim-0002"])
    request = new_request(
        "config-push",
        devices=[f"sim-{i:04d}" for i in range(1, 7)],
        params={"config": {"telemetry_interval_s": 99}},
        rollout={"abort": {"threshold_pct": 10, "min_devices": 50}},
    )
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    assert outcome.aborted is None
    assert sum(d.status is DeviceStatus.SUCCEEDED for d in outcome.devices) == 4


@pytest.mark.parametrize(
    ("abort", "field"),
    [
        ({"threshold_pct": 0}, "data.rollout.abort.threshold_pct"),
        ({"threshold_pct": 101}, "data.rollout.abort.threshold_pct"),
        ({"threshold_pct": 5, "outcome": "broken"}, "data.rollout.abort.outcome"),
        ({"threshold_pct": 5, "min_devices": 0}, "data.rollout.abort.min_devices"),
        ({"threshold_pct": 5, "typo": 1}, "data.rollout.abort.typo"),
    ],
)
def test_abort_criteria_out_of_bounds_are_refused_naming_the_field(
    abort: dict[str, object], field: str
) -> None:
    with pytest.raises(EventError) as caught:
        new_request("reboot", devices=["d"], rollout={"abort": abort})
    assert caught.value.field == field
