"""Device calls on non-blocking sockets, for a caller that runs its own loop.

The coordinator makes every device call of its request. Made on a thread each
(urllib3 in a pool of threads), a call cost it about 0.8 ms of CPU, most of it
hand-offs between threads under one GIL and urllib3's layers, and fan-out over
many devices was bound by that. :class:`HttpCallLoop` makes the same exchange
on non-blocking sockets in one epoll, whose descriptor the caller's loop
watches beside everything else it waits on: no thread, no hand-off, the answer
parsed by llhttp (``httptools``).

Every decision is :class:`~mayfly.devices.http.HttpDriver`'s own (what to send,
timeouts shrunk to the deadline, what an answer means, whether and when to
retry, the words of each error): this module only moves bytes, so a call ends
the same way on either path (the driver contract in
``tests/devices/test_driver_contract.py`` runs through both).

It speaks plain ``http://`` to an IP address; other addresses (``https``, host
names a resolver would block the loop on) are for the driver's own threads
(:meth:`HttpCallLoop.serves` says which). Bounds, as on the threaded path: an
answer's body at :data:`~mayfly.devices.http.MAX_ANSWER_BYTES` (refused, not
retried), its status line and headers at :data:`MAX_HEAD_BYTES`, every wait
for a socket at the attempt's timeout, and nothing past the call's deadline.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import re
import select
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httptools
from requests.structures import CaseInsensitiveDict

from mayfly.devices.driver import CallDone as Done
from mayfly.devices.driver import CallOutcome as Outcome
from mayfly.devices.http import MAX_ANSWER_BYTES, Retry
from mayfly.devices.inventory import Device
from mayfly.errors import DeviceActionError, DeviceUnavailableError

if TYPE_CHECKING:
    from mayfly.devices.http import HttpDriver

__all__ = ["MAX_HEAD_BYTES", "HttpCallLoop"]

#: Status line and headers of one answer, at most (1xx answers included).
MAX_HEAD_BYTES = 64 * 1024
_READ_BYTES = 65536
# RFC 3986 path characters, '%' kept: an address's own escapes stay as they are.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/._~-]*")
_UNSENDABLE = re.compile(r"[^\x20-\x7e\x80-\xff]")
_FIXED_HEADERS = (
    "Accept: application/json\r\nUser-Agent: mayfly-http-driver\r\nAccept-Encoding: identity\r\n"
)
_CONNECT, _SEND, _RECV, _WAIT = range(4)


@dataclass(frozen=True)
class _Target:
    endpoint: tuple[str, int, int]
    """(IP, port, family): what a kept-alive connection is kept for."""
    host_header: str
    prefix: str
    """The address's path, quoted, without its trailing slash."""


@lru_cache(maxsize=16384)
def _target(address: str) -> _Target | None:
    """Where ``address`` is reached, when this engine can reach it."""
    # Kept: serves() and start() ask for each call's address one after the
    # other. The host part (few) is parsed once, the path part (one per
    # device) only as much as it needs.
    scheme, sep, rest = address.partition("://")
    if scheme != "http" or not sep:
        return None
    netloc, slash, path = rest.partition("/")
    endpoint = _endpoint(netloc)
    if endpoint is None or "?" in path or "#" in path:
        return None
    path = (slash + path).rstrip("/")
    if not _PLAIN_PATH.fullmatch(path):
        # urlsplit's clean-up (line breaks and tabs dropped), then quoted.
        path = quote(urlsplit(f"http://h{path}").path, safe=_PATH_SAFE)
    return _Target(endpoint, netloc, path)


@lru_cache(maxsize=1024)
def _endpoint(netloc: str) -> tuple[str, int, int] | None:
    """(IP, port, family) of an address's ``host[:port]``, when the host is an IP address."""
    try:
        parts = urlsplit(f"http://{netloc}")
        port = parts.port or 80
        host = parts.hostname or ""
        ip = ip_address(host)
    except ValueError:
        return None
    if "@" in netloc or "%" in host:  # credentials, an IPv6 scope: the threaded path
        return None
    return host, port, socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class _Answer:
    """A response as :meth:`HttpDriver.judge` reads it (the ``Answer`` protocol)."""

    __slots__ = ("_headers", "content", "reason", "status_code")

    def __init__(self, status: int, reason: str, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.reason, self.content = status, reason, content
        self._headers = headers

    @property
    def headers(self) -> Mapping[str, str]:
        # Made when asked for (a retry's Retry-After), not for every success.
        return CaseInsensitiveDict(self._headers)


class _Conn:
    """One keep-alive connection and the llhttp parser of the answer it reads."""

    def __init__(self, endpoint: tuple[str, int, int], sock: socket.socket) -> None:
        self.endpoint, self.sock, self.fd = endpoint, sock, sock.fileno()
        self.parser = httptools.HttpResponseParser(self)
        self.watching = 0
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.reason = b""
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        """Bytes read while the status line and headers were unfinished."""
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.framed = False
        """A Content-Length or Transfer-Encoding came: the body does not end at EOF."""
        self.headers_done = False
        self.complete = False
        self.trailing = False
        """Another answer began after this one: nobody asked for it."""
        self.status = 0
        self.keep_alive = False

    # llhttp's callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.trailing = True

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in ("content-length", "transfer-encoding"):
            self.framed = True
        self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes <= MAX_ANSWER_BYTES:
            self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue...): the real one follows
            head_bytes = self.head_bytes
            self.reset()
            self.head_bytes = head_bytes
            return
        self.status = status
        self.complete = True
        # Asked here: once the callback returns, llhttp has reset for the next answer.
        self.keep_alive = self.parser.should_keep_alive()

    def answer(self) -> _Answer:
        reason = self.reason.decode("latin-1").strip()
        return _Answer(self.status, reason, self.headers, b"".join(self.body))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class _Call:
    __slots__ = (
        "attempt",
        "conn",
        "deadline",
        "device",
        "done",
        "out",
        "phase",
        "read_timeout",
        "request",
        "target",
        "timer",
        "token",
        "what",
    )

    def __init__(
        self,
        token: object,
        done: Done,
        device: Device,
        target: _Target,
        what: str,
        request: bytes,
        deadline: float | None,
    ) -> None:
        self.token, self.done, self.device, self.target = token, done, device, target
        self.what, self.request, self.deadline = what, request, deadline
        self.attempt = 1
        self.conn: _Conn | None = None
        self.out = memoryview(request)
        self.phase = _WAIT
        self.read_timeout = 0.0
        self.timer = 0
        """Which of its timers is current (the heap keeps stale ones)."""


class HttpCallLoop:
    """Device calls of one :class:`~mayfly.devices.http.HttpDriver`, on non-blocking
    sockets: a :class:`~mayfly.devices.driver.CallLoop`.

    Not thread-safe: one caller loop drives it. That loop waits for :attr:`fd`
    to be readable or for :meth:`next_wake`, whichever comes first, then calls
    :meth:`pump`, which moves every call along and tells each one that ended
    to its ``done``. Idle keep-alive connections are kept per device address
    (up to the driver's ``pool_size`` each) for later calls.
    """

    def __init__(self, driver: HttpDriver) -> None:
        self._driver = driver
        self._epoll = select.epoll()
        self._idle: dict[tuple[str, int, int], list[_Conn]] = {}
        self._by_fd: dict[int, tuple[_Call, _Conn]] = {}
        self._calls: set[_Call] = set()
        self._timers: list[tuple[float, int, int, _Call]] = []
        self._seq = itertools.count()
        self._ended: list[tuple[_Call, Outcome]] = []

    @property
    def fd(self) -> int:
        """Readable when a socket has news; :meth:`pump` then."""
        return self._epoll.fileno()

    @staticmethod
    def serves(device: Device) -> bool:
        """Whether this engine can reach ``device`` (plain http to an IP address)."""
        return _target(device.address) is not None

    def next_wake(self) -> float:
        """When :meth:`pump` must run even if :attr:`fd` stays quiet (a
        ``time.monotonic()`` value; ``-inf`` for now, ``inf`` for never)."""
        if self._ended:
            return -float("inf")
        while self._timers:
            when, _, timer, call = self._timers[0]
            if call.timer == timer and call in self._calls:
                return when
            heapq.heappop(self._timers)
        return float("inf")

    def start(
        self,
        token: object,
        device: Device,
        op: str,
        name: str | None,
        payload: dict[str, Any] | None,
        idempotency_key: str | None,
        deadline: float | None,
        done: Done,
    ) -> None:
        """Begin ``op`` (``state`` or ``action``) on ``device``, which this engine
        :meth:`serves`; ``done(token, outcome)`` is called from a later :meth:`pump`."""
        target = _target(device.address)
        if target is None:
            raise ValueError(f"not an address this engine serves: {device.address!r}")
        try:
            method, path, body, headers = self._driver.exchange(
                device, op, name, payload, idempotency_key
            )
        except DeviceActionError as exc:
            call = _Call(token, done, device, target, op, b"", deadline)
            self._calls.add(call)
            self._end(call, exc)
            return
        what = f"{method} {path}"
        call = _Call(token, done, device, target, what, b"", deadline)
        self._calls.add(call)
        bad = next((v for v in headers.values() if not _sendable(v)), None)
        if bad is not None:
            # A key is the caller's: refused before anything is sent, not retried.
            message = f"{what}: invalid header value {bad!r}"
            self._end(call, DeviceUnavailableError(device.id, message))
            return
        head = f"{method} {target.prefix}{path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
        head += f"{_FIXED_HEADERS}{extra}{length}\r\n"
        call.request = head.encode("latin-1") + (body or b"")
        self._attempt(call)

    def pump(self) -> None:
        """Move every call along: socket news, timers due, outcomes told."""
        events = self._epoll.poll(0)
        # Paired before any is handled: a descriptor closed and reused while
        # this batch is handled must not take another socket's event.
        for call, conn in [self._by_fd[fd] for fd, _ in events if fd in self._by_fd]:
            if call.conn is conn and not conn.closed and call in self._calls:
                self._on_ready(call, conn)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer, call = heapq.heappop(self._timers)
            if call.timer == timer and call in self._calls:
                self._on_timer(call)
        ended, self._ended = self._ended, []
        for call, outcome in ended:
            call.done(call.token, outcome)

    def cancel(self, done: Done, token: object = None) -> None:
        """Drop every call told to ``done`` (or only the one of ``token``):
        unanswered, its connection closed (an answer may still be on its way),
        never sent again (a retry's wait ends with it)."""
        for call in [
            c for c in self._calls if c.done == done and (token is None or c.token == token)
        ]:
            self._calls.discard(call)
            call.timer += 1
            if call.conn is not None:
                self._drop(call.conn)
                call.conn = None
        self._ended = [
            (c, o)
            for c, o in self._ended
            if c.done != done or (token is not None and c.token != token)
        ]

    def close(self) -> None:
        """Close every connection; calls in flight are dropped, untold."""
        for call in list(self._calls):
            self.cancel(call.done)
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        with contextlib.suppress(OSError):
            self._epoll.close()

    # -- one attempt --------------------------------------------------------

    def _attempt(self, call: _Call) -> None:
        try:
            timeouts = self._driver.timeouts(call.device, call.what, call.deadline)
        except DeviceUnavailableError as exc:
            self._end(call, exc)
            return
        connect, call.read_timeout = timeouts
        call.out = memoryview(call.request)
        endpoint = call.target.endpoint
        conn = self._take_idle(endpoint)
        if conn is not None:
            self._bind(call, conn)
            self._send(call, conn)
            return
        ip, port, family = endpoint
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(endpoint, sock)
        self._bind(call, conn)
        code = sock.connect_ex((ip, port))
        if code == 0:
            self._send(call, conn)
        elif code == errno.EINPROGRESS:
            call.phase = _CONNECT
            self._watch(conn, select.EPOLLOUT)
            self._set_timer(call, connect)
        else:
            self._failed(call, f"connection error ({_os_error(code)})")

    def _on_ready(self, call: _Call, conn: _Conn) -> None:
        if call.phase == _CONNECT:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._failed(call, f"connection error ({_os_error(code)})")
            else:
                self._send(call, conn)
        elif call.phase == _SEND:
            self._send(call, conn)
        elif call.phase == _RECV:
            self._receive(call, conn)

    def _on_timer(self, call: _Call) -> None:
        if call.phase == _WAIT:
            self._attempt(call)
        elif call.phase == _CONNECT:
            self._failed(call, "connect timeout")
        else:
            self._failed(call, "read timeout")

    def _send(self, call: _Call, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(call.out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failed(call, f"connection error ({_os_error(exc.errno, exc)})")
            return
        call.out = call.out[sent:]
        if call.out:
            call.phase = _SEND
            self._watch(conn, select.EPOLLOUT)
        else:
            call.phase = _RECV
            self._watch(conn, select.EPOLLIN)
        self._set_timer(call, call.read_timeout)

    def _receive(self, call: _Call, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed(call, f"connection error ({_os_error(exc.errno, exc)})")
            return
        keep_alive = True
        if not data:
            keep_alive = False
            if not (conn.headers_done and not conn.framed and not conn.complete):
                # The words http.client gives the threaded path.
                closed = "Remote end closed connection without response"
                self._failed(call, f"connection error ({closed})")
                return
            conn.status, conn.complete = conn.parser.get_status_code(), True  # body ends at EOF
        else:
            try:
                conn.parser.feed_data(data)
                if not conn.headers_done:
                    # llhttp keeps an unfinished header line whole, however long:
                    # counted here, so an endless one is cut one read past the bound.
                    conn.head_bytes += len(data)
            except httptools.HttpParserUpgrade:
                self._failed(call, "connection error (the device switched protocols)")
                return
            except httptools.HttpParserError as exc:
                if not conn.complete:
                    self._failed(call, f"connection error (malformed answer: {exc})")
                    return
                keep_alive = False  # bytes after the answer: this connection is done
        if conn.body_bytes > MAX_ANSWER_BYTES:
            # Not retried: the device would only send it again.
            self._drop(conn)
            call.conn = None
            message = f"{call.what}: answer of more than {MAX_ANSWER_BYTES} bytes"
            self._end(call, DeviceUnavailableError(call.device.id, message))
        elif conn.head_bytes > MAX_HEAD_BYTES:
            self._failed(call, f"connection error (answer headers over {MAX_HEAD_BYTES} bytes)")
        elif conn.complete:
            keep_alive = keep_alive and conn.keep_alive and not conn.trailing
            self._answered(call, conn, keep_alive)
        else:
            self._set_timer(call, call.read_timeout)

    def _answered(self, call: _Call, conn: _Conn, keep_alive: bool) -> None:
        answer = conn.answer()
        call.conn = None
        self._release(conn, keep_alive)
        try:
            verdict = self._driver.judge(call.device, call.what, answer)
        except DeviceActionError as exc:
            self._end(call, exc)
            return
        if isinstance(verdict, Retry):
            self._retry(call, verdict)
        else:
            self._end(call, verdict)

    def _failed(self, call: _Call, failure: str) -> None:
        if call.conn is not None:
            self._drop(call.conn)
            call.conn = None
        self._retry(call, Retry(failure))

    def _retry(self, call: _Call, failed: Retry) -> None:
        driver = self._driver
        try:
            delay = driver.wait_before(call.device, call.what, failed, call.attempt, call.deadline)
        except DeviceUnavailableError as exc:
            self._end(call, exc)
            return
        call.attempt += 1
        if not driver.sleeps_for_real:
            # The driver was given its own sleep (tests record the waits): its
            # wait, then the attempt, as on the threaded path.
            driver.sleep(delay)
            self._attempt(call)
            return
        call.phase = _WAIT
        self._set_timer(call, delay)

    def _end(self, call: _Call, outcome: Outcome) -> None:
        self._calls.discard(call)
        call.timer += 1
        self._ended.append((call, outcome))

    # -- connections and timers ---------------------------------------------

    def _bind(self, call: _Call, conn: _Conn) -> None:
        call.conn = conn
        self._by_fd[conn.fd] = (call, conn)

    def _watch(self, conn: _Conn, mask: int) -> None:
        if conn.watching == mask:
            return
        if conn.watching:
            self._epoll.modify(conn.fd, mask)
        else:
            self._epoll.register(conn.fd, mask)
        conn.watching = mask

    def _unwatch(self, conn: _Conn) -> None:
        self._by_fd.pop(conn.fd, None)
        if conn.watching:
            with contextlib.suppress(OSError):
                self._epoll.unregister(conn.fd)
            conn.watching = 0

    def _drop(self, conn: _Conn) -> None:
        self._unwatch(conn)
        conn.close()

    def _release(self, conn: _Conn, keep_alive: bool) -> None:
        self._unwatch(conn)
        idle = self._idle.setdefault(conn.endpoint, [])
        if keep_alive and len(idle) < self._driver.pool_size:
            conn.reset()
            idle.append(conn)
        else:
            conn.close()

    def _take_idle(self, endpoint: tuple[str, int, int]) -> _Conn | None:
        idle = self._idle.get(endpoint)
        while idle:
            conn = idle.pop()
            try:
                conn.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return conn  # open, and nothing unasked for waiting on it
            except OSError:
                pass
            conn.close()  # closed by the device meanwhile, or bytes nobody asked for
        return None

    def _set_timer(self, call: _Call, seconds: float) -> None:
        call.timer += 1
        when = time.monotonic() + seconds
        if call.deadline is not None:
            when = min(when, call.deadline)
        heapq.heappush(self._timers, (when, next(self._seq), call.timer, call))


def _sendable(value: str) -> bool:
    """A header value that cannot split the request or leave latin-1."""
    return _UNSENDABLE.search(value) is None


def _os_error(code: int | None, exc: OSError | None = None) -> str:
    """``[Errno 111] Connection refused``: the words the threaded path reports."""
    if code:
        return str(OSError(code, os.strerror(code)))
    return str(exc) if exc is not None else "connection error"
