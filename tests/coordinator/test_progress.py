"""Progress events of a running request: how often, what they carry, and never a failure."""

from __future__ import annotations

import pytest

from mayfly.coordinator.progress import ProgressReporter
from mayfly.coordinator.runner import DeviceProgress
from mayfly.errors import SinkError
from mayfly.events import DeviceStatus, TaskProgress, new_request, to_kafka_record

RUNNING, SUCCEEDED = DeviceStatus.RUNNING, DeviceStatus.SUCCEEDED


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reporter(sent: list[TaskProgress], clock: Clock, devices: int = 3) -> ProgressReporter:
    request = new_request("reboot", devices=[f"d{i}" for i in range(devices)], request_id="r1")
    reporter = ProgressReporter(request, "coord-1", sent.append, clock=clock, interval_s=0.5)
    reporter.started(devices, skipped=0)
    return reporter


def test_a_request_done_within_an_interval_reports_nothing() -> None:
    sent: list[TaskProgress] = []
    clock = Clock()
    reporter = _reporter(sent, clock)
    for i in range(3):
        reporter(DeviceProgress(f"d{i}", RUNNING, 0.0, "", 1))
        clock.now += 0.1
        reporter.tick()
        reporter(DeviceProgress(f"d{i}", SUCCEEDED, 100.0, "", 1))
    assert sent == []


def test_reports_come_an_interval_apart_with_counts_and_whats_new() -> None:
    sent: list[TaskProgress] = []
    clock = Clock()
    reporter = _reporter(sent, clock)
    reporter(DeviceProgress("d0", RUNNING, 0.0, "", 1))
    reporter(DeviceProgress("d0", RUNNING, 40.0, "downloading", 1))
    clock.now += 0.5
    reporter.tick()
    reporter(DeviceProgress("d0", SUCCEEDED, 100.0, "", 1))
    clock.now += 0.2
    reporter.tick()  # too soon
    clock.now += 0.3
    reporter.tick()
    clock.now += 0.5
    reporter.tick()  # nothing new: nothing sent

    assert [e.seq for e in sent] == [0, 1]
    first, second = sent
    assert first.counts == {DeviceStatus.QUEUED: 2, RUNNING: 1}
    assert [(d.device_id, d.percent, d.message) for d in first.devices] == [
        ("d0", 40.0, "downloading")
    ]
    assert second.counts == {DeviceStatus.QUEUED: 2, SUCCEEDED: 1}
    assert second.done == 1
    assert first.devices_total == 3
    assert first.id == "r1:progress:coord-1:0"
    to_kafka_record(second)  # a valid event


def test_too_much_news_goes_newest_first_and_the_rest_next_time() -> None:
    sent: list[TaskProgress] = []
    clock = Clock()
    reporter = _reporter(sent, clock, devices=500)
    for i in range(500):
        reporter(DeviceProgress(f"d{i}", RUNNING, 0.0, "x" * 1000, 1))
    reporter(DeviceProgress("d0", RUNNING, 10.0, "", 1))  # d0 is the newest now
    for _ in range(3):
        clock.now += 0.5
        reporter.tick()

    assert [len(e.devices) for e in sent] == [200, 200, 100]
    assert sent[0].devices[-1].device_id == "d0"
    assert {d.device_id for e in sent for d in e.devices} == {f"d{i}" for i in range(500)}
    assert max(len(d.message) for e in sent for d in e.devices) == 200


def test_a_sink_that_refuses_is_not_asked_again(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[TaskProgress] = []

    def refuse(event: TaskProgress) -> None:
        calls.append(event)
        raise SinkError("the runtime is gone")

    clock = Clock()
    request = new_request("reboot", devices=["d0"], request_id="r1")
    reporter = ProgressReporter(request, "coord-1", refuse, clock=clock)
    reporter.started(1, skipped=0)
    for percent in (10.0, 20.0):
        reporter(DeviceProgress("d0", RUNNING, percent, "", 1))
        clock.now += 1
        reporter.tick()

    assert len(calls) == 1
    assert "progress not reported" in caplog.text
