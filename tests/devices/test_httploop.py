"""HttpCallLoop: the coordinator's device calls on non-blocking sockets.

The driver contract (``test_driver_contract.py``, kind ``http-loop``) runs the
engine against the simulator; here a scripted device on a real loopback
socket sends what a broken or hostile device would, byte for byte.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mayfly.coordinator.devicecalls import DeviceCalls
from mayfly.devices import Device
from mayfly.devices.http import MAX_ANSWER_BYTES, HttpDriver
from mayfly.devices.httploop import MAX_HEAD_BYTES, HttpCallLoop
from mayfly.errors import DeviceUnavailableError
from tests.devices.loopdriven import LoopDriven

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"up":true}'

#: Answers a request (its bytes) on one connection; returns what to send, and
#: whether to close the connection afterwards.
Script = Callable[[bytes, int], tuple[bytes, bool]]


class ScriptedDevice:
    """A loopback TCP server answering each request with what its script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.hung_up = 0
        """Connections the client closed (EOF or reset seen on a read)."""
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def device(self, device_id: str = "dev-1") -> Device:
        return Device(id=device_id, address=f"http://127.0.0.1:{self.port}/devices/{device_id}")

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if not sep:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        self.hung_up += 1
                        return
                    buffer += chunk
                    continue
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                request, buffer = head + sep + rest[:length], rest[length:]
                self.requests.append(request)
                answer, close = self.script(request, len(self.requests))
                with contextlib.suppress(OSError):
                    conn.sendall(answer)
                if close:
                    return

    def stop(self) -> None:
        self._stop = True
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedDevice]]:
    made: list[ScriptedDevice] = []

    def make(script: Script) -> ScriptedDevice:
        made.append(ScriptedDevice(script))
        return made[-1]

    yield make
    for device in made:
        device.stop()


def _driver(**options: object) -> LoopDriven:
    return LoopDriven(HttpDriver(sleep=lambda _s: None, **options))  # type: ignore[arg-type]


def test_calls_to_many_devices_of_one_host_share_kept_alive_connections(scripted) -> None:
    fleet = scripted(lambda _r, _n: (OK, False))
    driver = _driver()
    try:
        answers = [driver.state(fleet.device(f"dev-{i % 50}")) for i in range(200)]
    finally:
        driver.close()
    assert answers == [{"up": True}] * 200
    assert fleet.connections == 1  # one at a time, so one connection for all 200


def test_a_connection_the_device_closed_while_idle_is_not_reused(scripted) -> None:
    # No "Connection: close" header: the close comes unannounced, after the answer.
    fleet = scripted(lambda _r, _n: (OK, True))
    driver = _driver(retries=0)
    try:
        for _ in range(5):
            time.sleep(0.02)  # the device's FIN arrives while the connection idles
            assert driver.state(fleet.device()) == {"up": True}
    finally:
        driver.close()
    assert fleet.connections == 5


def test_an_answer_too_big_is_refused_and_not_retried(scripted) -> None:
    size = 3 * MAX_ANSWER_BYTES
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size + 11}\r\n\r\n".encode()
    fleet = scripted(lambda _r, _n: (head + b'{"blob":"' + b"x" * size + b'"}', False))
    driver = _driver(retries=2)
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(fleet.device())
    finally:
        driver.close()
    assert str(caught.value) == (
        f"device dev-1: GET /state: answer of more than {MAX_ANSWER_BYTES} bytes"
    )
    assert len(fleet.requests) == 1


def test_endless_headers_are_cut_and_retried_as_a_connection_error(scripted) -> None:
    endless = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"y" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n"
    fleet = scripted(lambda _r, _n: (endless, True))
    driver = _driver(retries=1)
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(fleet.device())
    finally:
        driver.close()
    assert "after 2 attempts" in str(caught.value)
    assert "connection error" in str(caught.value)
    assert len(fleet.requests) == 2


def test_a_header_line_without_end_is_cut_one_read_past_the_bound(scripted) -> None:
    # 8 MiB of one header value, never finished: the parser would keep it all.
    endless = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"y" * (8 * 1024 * 1024)
    fleet = scripted(lambda _r, _n: (endless, False))
    driver = _driver(retries=0)
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(fleet.device(), deadline=time.monotonic() + 10)
    finally:
        driver.close()
    assert str(caught.value) == (
        "device dev-1: GET /state: connection error "
        f"(answer headers over {MAX_HEAD_BYTES} bytes) after 1 attempts"
    )


def test_a_body_ending_at_close_a_chunked_body_and_an_interim_answer_are_read(scripted) -> None:
    answers = {
        1: (b'HTTP/1.1 200 OK\r\n\r\n{"until": "close"}', True),
        2: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"a":\r\n3\r\n 1}\r\n0\r\n\r\n',
            False,
        ),
        3: (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, False),
    }
    fleet = scripted(lambda _r, n: answers[n])
    driver = _driver(retries=0)
    try:
        got = [driver.state(fleet.device()) for _ in range(3)]
    finally:
        driver.close()
    assert got == [{"until": "close"}, {"a": 1}, {"up": True}]


def test_garbage_is_a_connection_error_and_then_the_device_is_unavailable(scripted) -> None:
    fleet = scripted(lambda _r, _n: (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", True))
    driver = _driver(retries=1)
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(fleet.device())
    finally:
        driver.close()
    assert str(caught.value).startswith("device dev-1: GET /state: connection error (malformed")
    assert str(caught.value).endswith("after 2 attempts")


def test_a_device_trickling_its_answer_is_cut_at_the_deadline(scripted) -> None:
    def trickle(_request: bytes, _n: int) -> tuple[bytes, bool]:
        time.sleep(2)  # the read timeout (10 s) never fires: only the deadline ends it
        return OK, False

    fleet = scripted(trickle)
    driver = _driver(retries=3)
    started = time.monotonic()
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(fleet.device(), deadline=time.monotonic() + 0.3)
    finally:
        driver.close()
    assert time.monotonic() - started < 1.0
    assert "deadline passed" in str(caught.value)


def test_a_refused_connection_names_the_os_error() -> None:
    driver = _driver(retries=1)
    device = Device(id="dev-1", address="http://127.0.0.1:9/devices/dev-1")
    try:
        with pytest.raises(DeviceUnavailableError) as caught:
            driver.state(device)
    finally:
        driver.close()
    assert str(caught.value) == (
        "device dev-1: GET /state: connection error ([Errno 111] Connection refused)"
        " after 2 attempts"
    )


@pytest.mark.parametrize(
    ("address", "served"),
    [
        ("http://127.0.0.1:8080/devices/a", True),
        ("http://[::1]:8080/devices/a", True),
        ("http://10.0.0.7/a%20b", True),
        ("https://127.0.0.1/devices/a", False),
        ("http://device-7.lab:8080/", False),
        ("http://localhost:8080/", False),
        ("http://user:pw@127.0.0.1/", False),
        ("http://127.0.0.1:99999/", False),
    ],
)
def test_serves_plain_http_to_ip_addresses_only(address: str, served: bool) -> None:
    assert HttpCallLoop.serves(Device(id="d", address=address)) is served


def test_a_path_with_unsafe_characters_is_sent_quoted(scripted) -> None:
    fleet = scripted(lambda _r, _n: (OK, False))
    driver = _driver()
    device = Device(id="d", address=f"http://127.0.0.1:{fleet.port}/dev ices/\r\nX-Evil: 1")
    try:
        assert driver.state(device) == {"up": True}
    finally:
        driver.close()
    request_line, *headers = fleet.requests[0].split(b"\r\n")
    # urlsplit drops the line breaks (as urllib3 does); the rest is quoted into the path.
    assert request_line == b"GET /dev%20ices/X-Evil:%201/state HTTP/1.1"
    assert not any(h.startswith(b"X-Evil") for h in headers)


# -- through DeviceCalls, as the coordinator makes them ------------------------


@pytest.fixture
def owned() -> Iterator[Callable[[], HttpDriver]]:
    """A driver factory whose driver the test closes: its kept-alive connections
    must not outlive the test (DeviceCalls keeps a process's drivers)."""
    driver = HttpDriver()
    yield lambda: driver
    driver.close()


def _pool_threads() -> set[int | None]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("mayfly-device")}


def _answers(calls: DeviceCalls, count: int) -> list[tuple[object, bytes]]:
    import select

    found: list[tuple[object, bytes]] = []
    end = time.monotonic() + 10
    while len(found) < count and time.monotonic() < end:
        wait = max(0.0, min(calls.next_wake() - time.monotonic(), 0.5))
        select.select([calls.fd], [], [], wait)
        found += calls.completed()
    return found


def test_the_coordinators_calls_to_ip_addresses_start_no_thread(scripted, owned) -> None:
    fleet = scripted(lambda _r, _n: (OK, False))
    calls = DeviceCalls(owned, "req-1")
    before = _pool_threads()
    try:
        calls.warm()
        for token in range(40):  # 40 devices at once, as 40 task processes would ask
            frame = {"t": "call", "op": "state"}
            calls.submit(token, fleet.device(f"dev-{token}"), frame, {}, time.monotonic() + 5)
        found = _answers(calls, 40)
        # The pool's threads, had any call gone there (the device's own are "Thread-N").
        threads = _pool_threads() - before
    finally:
        calls.close()
    assert sorted(t for t, _ in found) == list(range(40))  # type: ignore[type-var]
    assert all(b'"ok":true' in data for _, data in found)
    assert threads == set()


def test_a_host_name_is_called_on_a_thread_and_answers_the_same(scripted, owned) -> None:
    fleet = scripted(lambda _r, _n: (OK, False))
    calls = DeviceCalls(owned, "req-1")
    device = Device(id="d", address=f"http://localhost:{fleet.port}/devices/d")
    try:
        calls.submit("t", device, {"t": "call", "op": "state"}, {}, time.monotonic() + 5)
        found = _answers(calls, 1)
    finally:
        calls.close()
    assert [t for t, _ in found] == ["t"]
    assert b'"value":{"up":true}' in found[0][1]


def test_a_call_dropped_in_flight_never_answers_a_later_request(scripted, owned) -> None:
    def numbered(_request: bytes, n: int) -> tuple[bytes, bool]:
        if n == 1:
            time.sleep(0.5)  # still on its way when its request ends
        body = b'{"n": %d}' % n
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), False

    fleet = scripted(numbered)
    first = DeviceCalls(owned, "req-1")
    first.submit("t1", fleet.device(), {"t": "call", "op": "state"}, {}, time.monotonic() + 5)
    deadline = time.monotonic() + 5
    while not fleet.requests and time.monotonic() < deadline:
        assert first.completed() == []  # moves the call along: connected, then sent
        time.sleep(0.01)
    first.close()
    time.sleep(0.7)  # the first answer has arrived on that connection by now
    later = DeviceCalls(owned, "req-2")  # the same process's driver and engine
    try:
        later.submit("t2", fleet.device(), {"t": "call", "op": "state"}, {}, time.monotonic() + 5)
        found = _answers(later, 1)
    finally:
        later.close()
    assert [t for t, _ in found] == ["t2"]
    assert b'"value":{"n":2}' in found[0][1]
    assert fleet.connections == 2
    assert fleet.hung_up == 1  # the dropped call's connection was closed at once, not kept
