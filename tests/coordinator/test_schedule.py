"""A rollout's schedule: its start, its end and its maintenance windows, as
arithmetic over time zones and as runs that wait, stop and hand over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mayfly.coordinator.schedule import Deferred, closes_at, open_spans, opens_at
from mayfly.errors import EventError
from mayfly.events import DeviceStatus, Schedule, TaskCompleted, new_request

from .conftest import Env, FleetFactory

# A Monday, in winter (Paris is UTC+1).
MONDAY = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _schedule(**fields: object) -> Schedule:
    return Schedule.model_validate(fields)


def test_a_not_before_opens_then_and_a_not_after_closes_for_ever() -> None:
    schedule = _schedule(
        not_before=MONDAY + timedelta(hours=1), not_after=MONDAY + timedelta(hours=3)
    )
    assert opens_at(schedule, MONDAY) == MONDAY + timedelta(hours=1)
    assert opens_at(schedule, MONDAY + timedelta(hours=2)) == MONDAY + timedelta(hours=2)
    assert closes_at(schedule, MONDAY + timedelta(hours=2)) == MONDAY + timedelta(hours=3)
    assert opens_at(schedule, MONDAY + timedelta(hours=3)) is None


def test_a_window_over_midnight_is_in_its_time_zone_and_on_its_days() -> None:
    # 22:00-02:00 Paris, Monday and Tuesday nights: 21:00-01:00 UTC in winter.
    schedule = _schedule(
        windows=[{"days": ["mon", "tue"], "start": "22:00", "end": "02:00"}],
        time_zone="Europe/Paris",
    )
    spans = open_spans(schedule, MONDAY)
    assert spans[:2] == [
        (datetime(2026, 1, 5, 21, tzinfo=UTC), datetime(2026, 1, 6, 1, tzinfo=UTC)),
        (datetime(2026, 1, 6, 21, tzinfo=UTC), datetime(2026, 1, 7, 1, tzinfo=UTC)),
    ]
    # Then next Monday: Wednesday to Sunday have none.
    assert spans[2][0] == datetime(2026, 1, 12, 21, tzinfo=UTC)
    inside = datetime(2026, 1, 5, 23, 30, tzinfo=UTC)
    assert opens_at(schedule, inside) == inside
    assert closes_at(schedule, inside) == datetime(2026, 1, 6, 1, tzinfo=UTC)


def test_a_window_keeps_its_wall_clock_across_a_daylight_saving_change() -> None:
    # Paris moves to UTC+2 on 29 March 2026: 09:00 local is 08:00 UTC then 07:00.
    schedule = _schedule(windows=[{"start": "09:00", "end": "10:00"}], time_zone="Europe/Paris")
    saturday = datetime(2026, 3, 28, 12, tzinfo=UTC)
    spans = open_spans(schedule, saturday)
    assert spans[0][0] == datetime(2026, 3, 29, 7, tzinfo=UTC)
    assert spans[1][0] == datetime(2026, 3, 30, 7, tzinfo=UTC)


def test_windows_are_cut_to_the_start_and_the_end() -> None:
    schedule = _schedule(
        windows=[{"start": "10:00", "end": "14:00"}],
        not_before=MONDAY,
        not_after=MONDAY + timedelta(days=1, hours=1),
    )
    assert open_spans(schedule, MONDAY - timedelta(days=2)) == [
        (MONDAY, MONDAY + timedelta(hours=2)),
        (MONDAY + timedelta(hours=22), MONDAY + timedelta(days=1, hours=1)),
    ]


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ({}, "data.rollout.schedule"),
        ({"windows": [{"start": "25:00", "end": "02:00"}]}, "data.rollout.schedule.windows.0"),
        ({"windows": [{"start": "02:00", "end": "02:00"}]}, "data.rollout.schedule.windows"),
        ({"windows": [{"days": [], "start": "01:00", "end": "02:00"}]}, "data.rollout.schedule"),
        ({"windows": [{"days": ["moon"], "start": "01:00", "end": "02:00"}]}, "data.rollout"),
        ({"not_before": "2026-01-05T12:00:00"}, "data.rollout.schedule.not_before"),
        (
            {"not_before": "2026-01-05T12:00:00Z", "not_after": "2026-01-05T11:00:00Z"},
            "data.rollout.schedule.not_after",
        ),
        (
            {"not_before": "2026-01-05T12:00:00Z", "time_zone": "../../etc/passwd"},
            "data.rollout.schedule.time_zone",
        ),
        ({"not_before": "2026-01-05T12:00:00Z", "at_end": "later"}, "data.rollout.schedule"),
        # A folder of the zone database, not a zone: refused, not an error of its own.
        (
            {"not_before": "2026-01-05T12:00:00Z", "time_zone": "Europe"},
            "data.rollout.schedule.time_zone",
        ),
        (
            {"windows": [{"days": ["mon"] * 100_000, "start": "01:00", "end": "02:00"}]},
            "data.rollout.schedule.windows.0.days",
        ),
        (
            {"windows": [{"days": ["mon", "mon"], "start": "01:00", "end": "02:00"}]},
            "data.rollout.schedule.windows",
        ),
    ],
)
def test_a_schedule_out_of_bounds_is_refused_naming_the_field(
    schedule: dict[str, object], field: str
) -> None:
    with pytest.raises(EventError) as caught:
        new_request("reboot", devices=["d"], rollout={"schedule": schedule})
    assert caught.value.field.startswith(field), caught.value.field


def test_a_request_before_its_start_is_deferred_untouched(env: Env, fleet: FleetFactory) -> None:
    server = fleet(2)
    opens = datetime.now(UTC) + timedelta(hours=1)
    request = new_request(
        "reboot",
        devices=server.simulator.device_ids(),
        rollout={"schedule": {"not_before": opens.isoformat()}},
    )
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, Deferred), outcome
    assert outcome.until == opens
    assert all(server.simulator.records(d)["last_request_at"] is None for d in request.devices)


def test_a_request_past_its_end_skips_its_devices_saying_so(env: Env, fleet: FleetFactory) -> None:
    server = fleet(2)
    ended = datetime.now(UTC) - timedelta(minutes=1)
    request = new_request(
        "reboot",
        devices=server.simulator.device_ids(),
        rollout={"schedule": {"not_after": ended.isoformat()}},
    )
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, TaskCompleted), outcome
    assert [d.status for d in outcome.devices] == [DeviceStatus.SKIPPED] * 2
    assert all("the schedule ended" in (d.error or "") for d in outcome.devices)
    assert all(server.simulator.records(d)["last_request_at"] is None for d in request.devices)


def test_a_window_closing_mid_run_stops_the_starts_and_hands_the_rest_over(
    env: Env, fleet: FleetFactory
) -> None:
    """Devices start at 10 a second in a window that closes 1 to 2 s in: that
    many run, the rest stay unstarted and the run is deferred to the next
    window (tomorrow, at the same time)."""
    server = fleet(40)
    now = datetime.now(UTC)
    start = (now - timedelta(minutes=1)).replace(microsecond=0)
    end = (now + timedelta(seconds=2)).replace(microsecond=0)  # what HH:MM:SS says
    left_s = (end - now).total_seconds()
    window = {"start": start.strftime("%H:%M:%S"), "end": end.strftime("%H:%M:%S")}
    request = new_request(
        "reboot",
        devices=server.simulator.device_ids(),
        rollout={"rate_per_minute": 600, "schedule": {"windows": [window]}},
    )
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, Deferred), outcome
    assert outcome.until == start + timedelta(days=1)
    touched = [d for d in request.devices if server.simulator.records(d)["last_request_at"]]
    assert left_s * 10 / 2 <= len(touched) <= left_s * 10 + 2, (len(touched), left_s)


@pytest.mark.parametrize(
    ("rollout", "field"),
    [
        ({"continuous": True}, "data.rollout.continuous"),  # device ids only: nothing joins
        ({"continuous": {"every_s": 0}}, "data.rollout.continuous.every_s"),
        ({"continuous": {"every_s": 90_000}}, "data.rollout.continuous.every_s"),
        ({"continuous": {"each": 5}}, "data.rollout.continuous"),
    ],
)
def test_a_continuous_request_needs_a_selector_and_a_sane_interval(
    rollout: dict[str, object], field: str
) -> None:
    with pytest.raises(EventError) as caught:
        new_request("reboot", devices=["d"], rollout=rollout)
    assert caught.value.field.startswith(field), caught.value.field


def test_a_continuous_request_with_no_device_yet_waits_for_one(
    env: Env, fleet: FleetFactory
) -> None:
    fleet(1)
    request = new_request(
        "reboot", selector={"site": "nowhere"}, rollout={"continuous": {"every_s": 30}}
    )
    before = datetime.now(UTC)
    outcome = env.coordinator().handle(request)
    assert isinstance(outcome, Deferred), outcome
    assert (
        before + timedelta(seconds=30) <= outcome.until <= datetime.now(UTC) + timedelta(seconds=30)
    )
