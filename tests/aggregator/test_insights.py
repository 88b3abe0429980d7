"""Insights on a small synthetic fleet whose answers are known by hand."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mayfly.aggregator.archive import ArchivedEvent
from mayfly.aggregator.insights import (
    choose_bucket,
    compute_insights,
    insights_to_json,
    percentile,
)

from .conftest import T0, device, rejection, result

MINUTE = timedelta(minutes=1)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def _fleet() -> list[ArchivedEvent]:
    """reboot: 4 requests (3 s, 5 s, 2 s, 10 s), 1 rejection; firmware-update: 1 request."""
    return [
        result("r1", at=T0, duration=3, devices=[device("a"), device("b", seconds=1.5)]),
        result(
            "r2",
            at=T0 + 1 * MINUTE,
            duration=5,
            cold_start_ms=12.0,
            devices=[
                device("a", at=T0 + MINUTE),
                device("b", "timed_out", seconds=3.0, error="no answer", at=T0 + MINUTE),
            ],
        ),
        result(
            "r3",
            at=T0 + 2 * MINUTE,
            duration=2,
            cold_start_ms=None,
            devices=[
                device(
                    "b",
                    "failed",
                    seconds=0.25,
                    error="DeviceActionError: b: refused: busy",
                    at=T0 + 2 * MINUTE,
                )
            ],
        ),
        result(
            "r4",
            at=T0 + 7 * MINUTE,
            duration=10,
            devices=[device("a"), device("c", "skipped", start=None)],
            status="partial",
        ),
        rejection("r5", task="reboot", at=T0 + 3 * MINUTE),
        result(
            "f1",
            task="firmware-update",
            at=T0 + 8 * MINUTE,
            duration=60,
            devices=[device("a", seconds=30)],
        ),
    ]


def test_per_task_rates_and_percentiles() -> None:
    insights = compute_insights(_fleet())
    assert (insights.results, insights.rejections) == (5, 1)
    firmware, rejected, reboot = insights.tasks
    assert (rejected.task, rejected.version, rejected.requests, rejected.rejected) == (
        "reboot",
        "-",
        1,
        1,
    )
    assert rejected.problems == {"rejected": ("r5",)}
    assert (reboot.task, reboot.version) == ("reboot", "1.2.0")
    assert (reboot.requests, reboot.succeeded, reboot.rejected) == (4, 1, 0)
    assert (reboot.partial, reboot.failed) == (2, 1)
    assert reboot.problems == {"partial": ("r4", "r2"), "failed": ("r3",)}
    assert reboot.success_rate == pytest.approx(1 / 4)
    # Devices run: 2 + 2 + 1 + 1 (the skipped one did not run); a succeeded 3 times, b once.
    assert (reboot.devices_run, reboot.device_successes) == (6, 4)
    assert reboot.device_success_rate == pytest.approx(4 / 6)
    assert reboot.p50_duration_s == pytest.approx(4.0)  # of 2, 3, 5, 10
    assert reboot.p95_duration_s == pytest.approx(9.25)
    assert reboot.p50_cold_start_ms == pytest.approx(8.0)  # of 8, 12, 8
    assert firmware.task == "firmware-update"
    assert firmware.success_rate == 1.0
    assert firmware.p50_duration_s == pytest.approx(60.0)


def test_devices_come_worst_first_with_their_failures_and_last_error() -> None:
    insights = compute_insights(_fleet(), top=2)
    assert insights.devices_total == 3
    b, a = insights.devices  # b fails most; a never fails but is slower than c
    assert b.device_id == "b"
    assert (b.executions, b.succeeded, b.failures) == (3, 1, 2)
    assert b.success_rate == pytest.approx(1 / 3)
    assert b.by_status == {"timed_out": 1, "failed": 1}
    assert b.last_error == "DeviceActionError: b: refused: busy"  # r3's, the later of two
    assert b.last_error_request == "r3"
    assert b.p50_duration_s == pytest.approx(1.5)
    assert (a.device_id, a.executions, a.success_rate, a.last_error) == ("a", 4, 1.0, None)

    c = compute_insights(_fleet(), top=None).devices[-1]
    # Only ever skipped: no execution, nothing to rate, not a failure.
    assert (c.device_id, c.executions, c.success_rate, c.failures) == ("c", 0, None, 0)
    assert c.by_status == {"skipped": 1}


def test_time_buckets_hold_latency_and_success_rate() -> None:
    insights = compute_insights(_fleet(), bucket=5 * MINUTE)
    first, second = insights.buckets
    assert first.start == T0
    # r1, r2, r3 and the rejection ended in the first five minutes.
    assert (first.requests, first.succeeded) == (4, 1)
    assert first.success_rate == pytest.approx(0.25)
    assert first.p50_duration_s == pytest.approx(3.0)
    assert second.start == T0 + 5 * MINUTE
    assert (second.requests, second.succeeded) == (2, 1)


def test_bucket_width_fits_the_span_of_the_data() -> None:
    # A 12 s run (the demo's) gets second buckets, not one bucket of a minute.
    assert choose_bucket(T0, T0 + timedelta(seconds=12)) == timedelta(seconds=1)
    assert choose_bucket(T0, T0 + 10 * MINUTE) == timedelta(seconds=15)
    assert choose_bucket(T0, T0 + 30 * MINUTE) == MINUTE
    assert choose_bucket(T0, T0 + timedelta(hours=6)) == timedelta(minutes=15)
    assert choose_bucket(T0, T0 + timedelta(days=30)) == timedelta(days=1)
    assert compute_insights(_fleet(), bucket=MINUTE).bucket == MINUTE


@pytest.mark.parametrize(
    ("width", "label"),
    [
        (timedelta(seconds=2), "2s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(milliseconds=500), "0.5s"),
        (timedelta(minutes=5), "5min"),
        (timedelta(hours=3), "3h"),
        (timedelta(days=7), "7d"),
    ],
)
def test_the_plot_names_its_bucket_width_in_the_unit_that_fits(
    width: timedelta, label: str
) -> None:
    from mayfly.aggregator.render import _bucket_label

    assert _bucket_label(width) == label


def test_nothing_in_nothing_out() -> None:
    insights = compute_insights([])
    assert insights.empty
    assert insights.tasks == insights.devices == insights.buckets == ()


def test_json_form_is_plain_values() -> None:
    data = insights_to_json(compute_insights(_fleet(), top=1))
    assert data["results"] == 5
    assert data["first"] == "2025-03-14T09:00:03Z"  # r1's finish
    assert data["bucket_seconds"] == 15.0  # the fleet's ten minutes, in 40 buckets
    assert data["devices"][0]["device_id"] == "b"
    assert data["devices"][0]["failures"] == 2
