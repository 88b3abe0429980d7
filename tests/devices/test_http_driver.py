"""HttpDriver against `responses`-mocked devices: answers, retries, refusals, deadlines."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import responses

from mayfly.devices.driver import DeviceDriver
from mayfly.devices.http import HttpDriver, RequestsTransport
from mayfly.devices.inventory import Device
from mayfly.errors import DeviceActionError, DeviceUnavailableError

BASE = "http://device.test:9100/devices/sim-0001"
STATE = f"{BASE}/state"
REBOOT = f"{BASE}/actions/reboot"
DEVICE = Device(id="sim-0001", address=BASE)
KEY = "k" * 40


class FakeSleep:
    """Records requested sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _sent_timeout(rsps: responses.RequestsMock) -> Any:
    request: Any = rsps.calls[0].request  # responses records the call's kwargs on it
    return request.req_kwargs["timeout"]


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
def make_driver(sleep: FakeSleep) -> Iterator[Callable[..., HttpDriver]]:
    """Builds drivers that sleep through the fake and are closed after the test."""
    made: list[HttpDriver] = []

    def make(**options: Any) -> HttpDriver:
        # `responses` scripts answers by patching requests: the driver's logic
        # is what these tests are about, over the requests transport.
        options.setdefault("transport", RequestsTransport(options.get("pool_size", 64)))
        made.append(HttpDriver(sleep=sleep, **options))
        return made[-1]

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def driver(make_driver: Callable[..., HttpDriver]) -> HttpDriver:
    return make_driver()


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def test_satisfies_the_driver_port() -> None:
    port: DeviceDriver = HttpDriver()
    port.close()


def test_state_returns_the_json_object(driver: HttpDriver, rsps: responses.RequestsMock) -> None:
    rsps.get(STATE, json={"firmware": "1.2.3", "up": True})

    assert driver.state(DEVICE) == {"firmware": "1.2.3", "up": True}
    assert len(rsps.calls) == 1


def test_trailing_slash_in_address_is_tolerated(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    rsps.get(STATE, json={})

    assert driver.state(Device(id="sim-0001", address=BASE + "/")) == {}


def test_action_posts_json_body_and_idempotency_key(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    rsps.post(REBOOT, json={"accepted": True}, status=202, headers={"Idempotent-Replayed": "true"})

    answer = driver.action(DEVICE, "reboot", {"delay": 5}, KEY)

    assert answer == {"accepted": True}
    sent = rsps.calls[0].request
    assert sent.headers["Idempotency-Key"] == KEY
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.body == b'{"delay":5}'


def test_action_name_cannot_escape_the_actions_path(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    rsps.post(f"{BASE}/actions/..%2Fstate", json={})

    driver.action(DEVICE, "../state", {}, KEY)

    assert rsps.calls[0].request.url == f"{BASE}/actions/..%2Fstate"


def test_retried_post_sends_the_same_key_and_body_every_time(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.post(REBOOT, status=503)
    rsps.post(REBOOT, status=503)
    rsps.post(REBOOT, json={"ok": True})

    assert driver.action(DEVICE, "reboot", {"delay": 5}, KEY) == {"ok": True}

    assert len(rsps.calls) == 3
    assert {c.request.headers["Idempotency-Key"] for c in rsps.calls} == {KEY}
    assert {c.request.body for c in rsps.calls} == {b'{"delay":5}'}
    assert len(sleep.calls) == 2


def test_connect_timeout_then_success(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, body=requests.ConnectTimeout("slow"))
    rsps.get(STATE, json={"up": True})

    assert driver.state(DEVICE) == {"up": True}
    assert len(rsps.calls) == 2
    assert len(sleep.calls) == 1


def test_read_timeout_exhausted_raises_unavailable(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, body=requests.ReadTimeout("slow"))

    with pytest.raises(DeviceUnavailableError, match=r"GET /state: read timeout after 4 attempts"):
        driver.state(DEVICE)

    assert len(rsps.calls) == 4
    assert len(sleep.calls) == 3


def test_5xx_then_success_backs_off_exponentially(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, status=500)
    rsps.get(STATE, status=502)
    rsps.get(STATE, json={"up": True})

    assert driver.state(DEVICE) == {"up": True}

    assert len(rsps.calls) == 3
    first, second = sleep.calls
    assert 0.1 <= first <= 0.11
    assert 0.2 <= second <= 0.22


def test_backoff_is_capped(
    make_driver: Callable[..., HttpDriver], rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    driver = make_driver(retries=4, backoff=1.0, max_backoff=2.0)
    rsps.get(STATE, status=500)

    with pytest.raises(DeviceUnavailableError):
        driver.state(DEVICE)

    assert all(s <= 2.2 for s in sleep.calls)
    assert sleep.calls[-1] >= 2.0


def test_503_exhausted_raises_unavailable_naming_status_and_attempts(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    rsps.post(REBOOT, status=503)

    with pytest.raises(DeviceUnavailableError) as caught:
        driver.action(DEVICE, "reboot", {}, KEY)

    assert str(caught.value) == "device sim-0001: POST /actions/reboot: 503 after 4 attempts"
    assert caught.value.device_id == "sim-0001"
    assert len(rsps.calls) == 4


def test_zero_retries_makes_one_attempt(
    make_driver: Callable[..., HttpDriver], rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, status=503)

    with pytest.raises(DeviceUnavailableError, match="after 1 attempts"):
        make_driver(retries=0).state(DEVICE)

    assert len(rsps.calls) == 1
    assert sleep.calls == []


def test_429_retry_after_seconds_is_honoured(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.post(REBOOT, status=429, headers={"Retry-After": "2"})
    rsps.post(REBOOT, json={"ok": True})

    assert driver.action(DEVICE, "reboot", {}, KEY) == {"ok": True}
    assert sleep.calls == [2.0]


def test_429_retry_after_http_date_is_honoured(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    when = datetime.now(UTC) + timedelta(seconds=4)
    rsps.get(STATE, status=429, headers={"Retry-After": format_datetime(when, usegmt=True)})
    rsps.get(STATE, json={})

    assert driver.state(DEVICE) == {}
    (slept,) = sleep.calls
    # HTTP-dates have whole seconds: the wait is within a second of the 4 asked for.
    assert 2.9 <= slept <= 4.0


def test_retry_after_in_the_past_retries_at_once(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, status=503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    rsps.get(STATE, json={})

    driver.state(DEVICE)
    assert sleep.calls == [0.0]


def test_retry_after_above_the_cap_is_capped(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, status=503, headers={"Retry-After": "3600"})
    rsps.get(STATE, json={})

    driver.state(DEVICE)
    assert sleep.calls == [10.0]


def test_unreadable_retry_after_falls_back_to_backoff(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, status=429, headers={"Retry-After": "soon"})
    rsps.get(STATE, json={})

    driver.state(DEVICE)
    (slept,) = sleep.calls
    assert 0.1 <= slept <= 0.11


def test_404_raises_action_error_without_retry(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.post(f"{BASE}/actions/explode", status=404)

    with pytest.raises(DeviceActionError, match=r"POST /actions/explode: 404 Not Found$"):
        driver.action(DEVICE, "explode", {}, KEY)

    assert len(rsps.calls) == 1
    assert sleep.calls == []


def test_409_surfaces_the_devices_error(driver: HttpDriver, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BASE}/actions/activate", status=409, json={"error": "not staged"})

    with pytest.raises(DeviceActionError) as caught:
        driver.action(DEVICE, "activate", {}, KEY)

    assert str(caught.value) == "device sim-0001: POST /actions/activate: 409 Conflict: not staged"
    assert len(rsps.calls) == 1


def test_malformed_json_raises_action_error(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    rsps.get(STATE, body="{not json", content_type="application/json")

    with pytest.raises(DeviceActionError, match=r"GET /state: malformed JSON answer \(200\)"):
        driver.state(DEVICE)
    assert len(rsps.calls) == 1


def test_json_array_raises_action_error(driver: HttpDriver, rsps: responses.RequestsMock) -> None:
    rsps.get(STATE, json=[1, 2])

    with pytest.raises(DeviceActionError, match=r"malformed JSON answer \(200\): list, not an obj"):
        driver.state(DEVICE)


def test_unserialisable_payload_raises_action_error_without_a_call(
    driver: HttpDriver, rsps: responses.RequestsMock
) -> None:
    with pytest.raises(DeviceActionError, match="payload is not JSON"):
        driver.action(DEVICE, "reboot", {"at": float("nan")}, KEY)
    assert len(rsps.calls) == 0


def test_passed_deadline_makes_no_call(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(STATE, json={})

    with pytest.raises(DeviceUnavailableError, match="deadline passed before GET /state"):
        driver.state(DEVICE, deadline=time.monotonic() - 1)

    assert len(rsps.calls) == 0
    assert sleep.calls == []


def test_deadline_stops_a_sleep_that_would_pass_it(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.post(REBOOT, status=503, headers={"Retry-After": "5"})

    with pytest.raises(
        DeviceUnavailableError,
        match=r"deadline passed: POST /actions/reboot: 503 after 1 attempt",
    ):
        driver.action(DEVICE, "reboot", {}, KEY, deadline=time.monotonic() + 1)

    assert len(rsps.calls) == 1
    assert sleep.calls == []


def test_deadline_shrinks_the_timeouts(driver: HttpDriver, rsps: responses.RequestsMock) -> None:
    rsps.get(STATE, json={})

    driver.state(DEVICE, deadline=time.monotonic() + 0.5)

    connect, read = _sent_timeout(rsps)
    assert 0 < connect <= 0.5
    assert 0 < read <= 0.5


def test_default_timeouts_are_sent(driver: HttpDriver, rsps: responses.RequestsMock) -> None:
    rsps.get(STATE, json={})

    driver.state(DEVICE)

    assert _sent_timeout(rsps) == (2.0, 10.0)


def test_connection_refused_retried_then_unavailable(
    driver: HttpDriver, rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.post(REBOOT, body=requests.ConnectionError("[Errno 111] Connection refused"))

    with pytest.raises(DeviceUnavailableError) as caught:
        driver.action(DEVICE, "reboot", {}, KEY)

    assert str(caught.value) == (
        "device sim-0001: POST /actions/reboot: "
        "connection error ([Errno 111] Connection refused) after 4 attempts"
    )
    assert len(rsps.calls) == 4
    assert len(sleep.calls) == 3


def test_real_refused_connection_names_the_os_error(
    make_driver: Callable[..., HttpDriver],
) -> None:
    # Port 9 (discard) on loopback is closed on any sane host: a genuine refusal.
    device = Device(id="sim-0001", address="http://127.0.0.1:9/devices/sim-0001")

    with pytest.raises(DeviceUnavailableError, match=r"Connection refused\) after 2 attempts"):
        make_driver(retries=1).state(device)


class _KeepAliveDevice(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real devices speak
    disable_nagle_algorithm = True  # else headers and body meet delayed ACKs: 40 ms a call
    peers: set[tuple[str, int]]

    def do_GET(self) -> None:
        self.peers.add(self.client_address)
        body = b'{"up": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_connections_are_kept_alive_and_shared_across_threads() -> None:
    _KeepAliveDevice.peers = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveDevice)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    device = Device(id="sim-0001", address=f"http://127.0.0.1:{server.server_port}/d/sim-0001")
    driver = HttpDriver(pool_size=4)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda _: driver.state(device), range(200)))
    finally:
        driver.close()
        server.shutdown()
        server.server_close()
        thread.join()

    assert answers == [{"up": True}] * 200
    # 200 calls from 4 threads over at most 4 connections: one per call would be 200.
    assert len(_KeepAliveDevice.peers) <= 4


class _EndlessDevice(BaseHTTPRequestHandler):
    """Answers /big with a 3 MiB JSON object (a broken or hostile device), else a small one."""

    protocol_version = "HTTP/1.1"
    served: list[str]

    def do_GET(self) -> None:
        self.served.append(self.path)
        big = self.path.endswith("/big/state")
        body = b'{"blob": "' + b"x" * (3 * 1024 * 1024) + b'"}' if big else b'{"up": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the driver stopped reading: that is the point
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_an_answer_too_big_is_refused_unread_and_not_retried() -> None:
    # The coordinator makes every device call of its request: a device that
    # answers without end must not fill its memory.
    from mayfly.devices.http import MAX_ANSWER_BYTES

    _EndlessDevice.served = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EndlessDevice)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    driver = HttpDriver(retries=2, pool_size=1)
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(Device(id="big", address=f"{base}/big"))
        # The same (only) pooled connection slot still serves the next call.
        assert driver.state(Device(id="small", address=f"{base}/small")) == {"up": True}
    finally:
        driver.close()
        server.shutdown()
        server.server_close()
    assert f"answer of more than {MAX_ANSWER_BYTES} bytes" in str(caught.value)
    assert _EndlessDevice.served == ["/big/state", "/small/state"]
