"""A rollout's pace: rate, exponential ramp and waves, as arithmetic and as runs."""

from __future__ import annotations

import itertools
from datetime import datetime

import pytest

from mayfly.coordinator.pacing import Pace, pace_steps, run_budget_s, starts_span_s, wave_bounds
from mayfly.coordinator.progress import ProgressReporter, ended_before
from mayfly.errors import EventError
from mayfly.events import (
    DeviceResult,
    DeviceStatus,
    Rollout,
    TaskCompleted,
    TaskProgress,
    new_request,
)

from .conftest import Env, FleetFactory


def _starts(pace: Pace, seconds: float, step: float = 0.01) -> list[float]:
    """When a pace lets devices start over ``seconds`` of a fake clock, each
    ending as soon as it starts (all succeed)."""
    at, started = 0.0, list[float]()
    while at <= seconds:
        n = len(started)
        if pace.take(at, started=n, ended=n, succeeded=n):
            started.append(at)
        else:
            at += step
    return started


def test_a_rate_starts_devices_evenly_at_the_rate() -> None:
    starts = _starts(Pace(Rollout(rate_per_minute=600), 2000, now=0.0), 10.0)
    assert starts[0] == 0.0
    assert 99 <= len(starts) <= 101  # 10 a second for 10 s, the first at once
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 0.12
    assert min(gaps) > 0.08


def test_a_shard_starts_at_its_share_of_the_rate() -> None:
    starts = _starts(Pace(Rollout(rate_per_minute=600), 500, now=0.0, share=0.25), 10.0)
    assert 24 <= len(starts) <= 26


def test_an_exponential_ramp_multiplies_the_rate_after_each_step_of_successes() -> None:
    ramp = {"base_per_minute": 60, "increment_factor": 2, "increase_after": 5}
    starts = _starts(Pace(Rollout(ramp=ramp), 100, now=0.0), 10.0, step=0.001)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
    # 5 devices a second apart, then 5 at 0.5 s, then 5 at 0.25 s ...
    assert gaps[:4] == [1.0] * 4
    assert gaps[5:9] == [0.5] * 4
    assert gaps[10:14] == [0.25] * 4


def test_a_ramp_stops_growing_at_its_maximum() -> None:
    rollout = Rollout(ramp={"base_per_minute": 60, "increase_after": 1, "max_per_minute": 240})
    pace = Pace(rollout, 100, now=0.0)
    assert pace.per_second(0) == 1.0
    assert pace.per_second(50) == 4.0


def test_a_wave_starts_only_once_every_device_of_the_one_before_ended() -> None:
    pace = Pace(Rollout(waves=[2, "50%"]), 10, now=0.0)
    assert pace.bounds == [2, 7, 10]
    assert pace.take(0.0, started=0, ended=0, succeeded=0)
    assert pace.take(0.0, started=1, ended=0, succeeded=0)
    assert not pace.take(0.0, started=2, ended=1, succeeded=1)  # the first wave runs
    assert pace.take(0.0, started=2, ended=2, succeeded=2)
    assert pace.wave_of(2) == 2
    assert not pace.take(0.0, started=7, ended=6, succeeded=6)
    assert pace.take(0.0, started=7, ended=7, succeeded=7)


@pytest.mark.parametrize(
    ("waves", "total", "bounds"),
    [
        ([10, "25%"], 100, [10, 35, 100]),
        (["0.5%"], 10, [1, 10]),  # a share rounds up: no wave is empty
        ([500], 100, [100]),
        (["100%", 5], 20, [20]),
        (None, 7, [7]),
    ],
)
def test_wave_bounds(waves: list[int | str] | None, total: int, bounds: list[int]) -> None:
    assert wave_bounds(waves, total) == bounds


def test_the_span_of_starts_is_what_the_rate_says() -> None:
    assert starts_span_s(Rollout(rate_per_minute=600), 2000) == pytest.approx(199.9)
    ramp = Rollout(ramp={"base_per_minute": 60, "increase_after": 10, "max_per_minute": 240})
    assert [s.per_minute for s in pace_steps(ramp, 40)] == [60, 120, 240]
    assert starts_span_s(Rollout(waves=[5]), 10) is None
    request = new_request("reboot", devices=["d"], rollout={"rate_per_minute": 60})
    assert run_budget_s(request, 30.0, 11) == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("rollout", "field"),
    [
        ({"rate_per_minute": 0}, "data.rollout.rate_per_minute"),
        ({"rate_per_minute": 0.001}, "data.rollout.rate_per_minute"),
        (
            {"ramp": {"base_per_minute": 10, "increase_after": 5, "increment_factor": 1.001}},
            "data.rollout.ramp.increment_factor",
        ),
        ({"rate_per_minute": 1e9}, "data.rollout.rate_per_minute"),
        ({"rate_per_minute": "fast"}, "data.rollout.rate_per_minute"),
        ({"waves": []}, "data.rollout.waves"),
        ({"waves": ["0%"]}, "data.rollout.waves.0"),
        ({"waves": [5, "101%"]}, "data.rollout.waves.1"),
        ({"waves": [0]}, "data.rollout.waves.0"),
        ({"waves": list(range(1, 200))}, "data.rollout.waves"),
        ({"ramp": {"base_per_minute": 10}}, "data.rollout.ramp.increase_after"),
        (
            {"ramp": {"base_per_minute": 10, "increase_after": 5, "increment_factor": 1}},
            "data.rollout.ramp.increment_factor",
        ),
        (
            {"ramp": {"base_per_minute": 10, "increase_after": 5, "max_per_minute": 5}},
            "data.rollout.ramp.max_per_minute",
        ),
        (
            {"rate_per_minute": 5, "ramp": {"base_per_minute": 10, "increase_after": 5}},
            "data.rollout.ramp",
        ),
    ],
)
def test_a_pace_out_of_bounds_is_refused_naming_the_field(
    rollout: dict[str, object], field: str
) -> None:
    with pytest.raises(EventError) as caught:
        new_request("reboot", devices=["d"], rollout=rollout)
    assert caught.value.field.startswith(field), caught.value.field


def test_a_paced_run_takes_the_time_its_rate_says(env: Env, fleet: FleetFactory) -> None:
    server = fleet(30)
    ids = server.simulator.device_ids()
    request = new_request("reboot", devices=ids, rollout={"rate_per_minute": 1200})
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    assert all(d.status is DeviceStatus.SUCCEEDED for d in outcome.devices)
    starts = sorted(d.started_at for d in outcome.devices if d.started_at)
    span = (starts[-1] - starts[0]).total_seconds()
    # 20 a second: never quicker (the first starts at once, then one each
    # 50 ms), and late by no more than a loaded machine makes it.
    assert 29 / 20 * 0.97 <= span <= 29 / 20 * 2, span


def test_waves_start_each_after_the_one_before_ended(env: Env, fleet: FleetFactory) -> None:
    server = fleet(12)
    ids = server.simulator.device_ids()
    request = new_request("reboot", devices=ids, rollout={"waves": [2, "25%"]})
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    by_id = {d.device_id: d for d in outcome.devices}
    waves = [ids[:2], ids[2:5], ids[5:]]
    for before, after in itertools.pairwise(waves):
        ended = max(_at(by_id[d].finished_at) for d in before)
        assert min(_at(by_id[d].started_at) for d in after) >= ended


def _at(value: datetime | None) -> datetime:
    assert value is not None
    return value


def test_a_coordinator_going_on_after_another_runs_only_the_devices_not_ended(
    env: Env, fleet: FleetFactory
) -> None:
    server = fleet(10)
    ids = server.simulator.device_ids()
    request = new_request("reboot", devices=ids, rollout={"rate_per_minute": 6000})
    earlier = [
        DeviceResult(device_id=ids[0], status=DeviceStatus.SUCCEEDED, attempts=1, output="kept"),
        DeviceResult(device_id=ids[1], status=DeviceStatus.FAILED, attempts=2, error="broke"),
        # Skipped by the stop of the coordinator that died: runs again.
        DeviceResult(device_id=ids[2], status=DeviceStatus.SKIPPED, error="stopped"),
    ]
    reports = [_report(request.id, earlier), _report("another-request", earlier)]

    class Reports:
        def reports_of(self, _request: object) -> list[TaskProgress]:
            return reports

    coordinator = env.coordinator()
    coordinator.checkpoints = Reports()
    outcome = coordinator.handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    by_id = {d.device_id: d for d in outcome.devices}
    assert len(by_id) == 10
    assert by_id[ids[0]].output == "kept"
    assert by_id[ids[1]].error == "broke"
    touched = {d for d in ids if server.simulator.records(d)["last_request_at"] is not None}
    assert touched == set(ids[2:])
    assert by_id[ids[2]].status is DeviceStatus.SUCCEEDED


def _report(request_id: str, ended: list[DeviceResult]) -> TaskProgress:
    from datetime import UTC

    return TaskProgress(
        request_id=request_id,
        task="reboot",
        coordinator="c-1",
        seq=0,
        started_at=datetime.now(UTC),
        devices_total=10,
        ended=tuple(ended),
    )


def test_a_paced_reporter_sends_every_ended_device_once() -> None:
    request = new_request("reboot", devices=["d"], rollout={"rate_per_minute": 60})
    sent: list[TaskProgress] = []
    now = [0.0]
    reporter = ProgressReporter(request, "c-1", sent.append, checkpoint=True, clock=lambda: now[0])
    reporter.started(450, 0)
    for i in range(450):
        result = DeviceResult(device_id=f"d{i}", status=DeviceStatus.SUCCEEDED, output="x" * 2000)
        reporter.ended(result)
    now[0] = 1.0
    reporter.tick()
    # 900 kB of results: several events, each under the budget, all sent now.
    assert len(sent) >= 3
    assert all(len(e.model_dump_json()) < 1_000_000 for e in sent)
    assert sorted(ended_before(sent, request.id)) == sorted(f"d{i}" for i in range(450))
    unpaced: list[TaskProgress] = []
    plain = ProgressReporter(request, "c-2", unpaced.append, clock=lambda: now[0])
    plain.started(1, 0)
    plain.ended(DeviceResult(device_id="d0", status=DeviceStatus.SUCCEEDED))
    now[0] = 5.0
    plain.tick()
    assert all(not e.ended for e in unpaced)


def test_a_ramp_without_a_maximum_stops_at_the_highest_pace_and_plans_in_few_steps() -> None:
    rollout = Rollout(ramp={"base_per_minute": 0.01, "increment_factor": 1.01, "increase_after": 1})
    pace = Pace(rollout, 10_000_000, now=0.0)
    assert pace.per_second(10**9) == 1000.0  # no overflow, the cap
    steps = pace_steps(rollout, 10_000_000)
    assert len(steps) < 2000
    assert steps[-1].per_minute == 60_000.0
    assert sum(s.devices for s in steps) == 10_000_000
