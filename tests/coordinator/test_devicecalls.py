"""DeviceCalls: the coordinator's side of a package's device calls.

A recording driver stands in for devices here: what is under test is the
hand-off (keys, answers, refusals), which the hostile tests also run end to
end against the simulator.
"""

from __future__ import annotations

import json
import select
import time
from typing import Any

from mayfly.coordinator.devicecalls import DeviceCalls
from mayfly.devices import Device, idempotency_key
from mayfly.errors import DeviceUnavailableError

DEVICE = Device(id="dev-1", address="http://127.0.0.1:9/devices/dev-1")


class Recorder:
    def __init__(
        self, answer: object = None, error: Exception | None = None, delay_s: float = 0.0
    ) -> None:
        self.calls: list[tuple[str, str, str | None]] = []
        self.answer = answer if answer is not None else {"ok": True}
        self.error = error
        self.delay_s = delay_s
        self.closed = False

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        self.calls.append((device.id, "state", None))
        return self._reply()

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        self.calls.append((device.id, name, idempotency_key))
        return self._reply()

    def _reply(self) -> Any:
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.answer

    def close(self) -> None:
        self.closed = True


def _answers(calls: DeviceCalls, count: int) -> list[tuple[object, dict[str, Any]]]:
    found: list[tuple[object, dict[str, Any]]] = []
    end = time.monotonic() + 10
    while len(found) < count and time.monotonic() < end:
        select.select([calls.fd], [], [], 1.0)
        found += [(token, json.loads(data[4:])) for token, data in calls.completed()]
    return found


def _action(name: str) -> dict[str, Any]:
    return {"t": "call", "op": "action", "name": name, "payload": {}}


def test_keys_count_each_action_name_within_an_attempt() -> None:
    driver = Recorder()
    calls = DeviceCalls(lambda: driver, "req-1")
    ordinals: dict[str, int] = {}
    try:
        for token, frame in enumerate([_action("reboot"), _action("push"), _action("reboot")]):
            calls.submit(token, DEVICE, frame, ordinals, time.monotonic() + 5)
            _answers(calls, 1)
    finally:
        calls.close()
    assert driver.calls == [
        ("dev-1", "reboot", idempotency_key("req-1", "dev-1", "reboot", 0)),
        ("dev-1", "push", idempotency_key("req-1", "dev-1", "push", 0)),
        ("dev-1", "reboot", idempotency_key("req-1", "dev-1", "reboot", 1)),
    ]


def test_the_next_request_of_a_process_reuses_the_driver_but_none_of_the_last_ones_answers() -> (
    None
):
    made: list[Recorder] = []

    def factory() -> Recorder:
        made.append(Recorder(delay_s=0.3))
        return made[-1]

    first = DeviceCalls(factory, "req-1")
    first.submit("late", DEVICE, _action("reboot"), {}, time.monotonic() + 5)
    first.close()  # its request ended while the device was still answering
    second = DeviceCalls(factory, "req-2")  # its pipe may get the first's numbers
    try:
        second.submit("mine", DEVICE, _action("reboot"), {}, time.monotonic() + 5)
        answers = _answers(second, 1)
        time.sleep(0.4)  # the first's late answer has come back meanwhile
        answers += [(token, json.loads(data[4:])) for token, data in second.completed()]
    finally:
        second.close()
    assert [token for token, _ in answers] == ["mine"]
    assert len(made) == 1  # one driver, one connection pool, for both requests
    assert made[0].calls == [
        ("dev-1", "reboot", idempotency_key("req-1", "dev-1", "reboot", 0)),
        ("dev-1", "reboot", idempotency_key("req-2", "dev-1", "reboot", 0)),
    ]


def test_a_refusal_a_driver_bug_and_an_oversized_answer_are_answers_not_crashes() -> None:
    cases = [
        (Recorder(error=DeviceUnavailableError("dev-1", "rebooting")), "unavailable", "rebooting"),
        (Recorder(error=KeyError("oops")), "unavailable", "driver error: KeyError"),
        (Recorder(answer={"blob": "x" * 300_000}), "refused", "exceeds"),
    ]
    for driver, kind, words in cases:
        calls = DeviceCalls(lambda d=driver: d, "req-1")
        try:
            calls.submit("t", DEVICE, {"t": "call", "op": "state"}, {}, time.monotonic() + 5)
            [(token, answer)] = _answers(calls, 1)
        finally:
            calls.close()
        assert token == "t"
        assert answer["ok"] is False, answer
        assert answer["kind"] == kind, answer
        assert words in answer["reason"], answer


def test_no_driver_is_made_for_a_request_that_calls_no_device() -> None:
    made: list[Recorder] = []
    calls = DeviceCalls(lambda: made.append(Recorder()) or made[-1], "req-1")
    calls.close()
    assert made == []
