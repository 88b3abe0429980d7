"""Device calls made by the coordinator on behalf of its task processes.

Package code never holds a network connection: its ``ctx.device.state()`` and
``ctx.device.action(...)`` become ``call`` frames, and the coordinator
performs each one on the device of that process's current attempt, with the
request's driver, and sends the answer back. So a package reaches exactly
the device it was given, whatever addresses or ports the fleet shares, and
the sandbox can refuse it every socket.

The coordinator's loop stays single-threaded and never waits on a device. A
call to an HTTP device at an IP address runs on non-blocking sockets
(the driver's :class:`~mayfly.devices.driver.CallLoop`: ``HttpDriver``'s
:mod:`~mayfly.devices.httploop`),
whose epoll the loop watches with the channels; any other call (another
driver, ``https``, a host name) runs on a thread pool, and its finished answer,
encoded, is queued and announced on a pipe the loop watches too. Both reach
the loop through one descriptor, :attr:`DeviceCalls.fd`.

The pool and the driver (its connection pools) are kept for the process's
later requests (:func:`_shared`): a coordinator serving queued requests would
otherwise start a thread, build a driver and open a connection for each one.
Nothing of a request stays in them: its calls' answers go to its own queue,
and a call still running when its request ended is answered to nobody.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from mayfly.coordinator.frames import MAX_FRAME_BYTES, encode
from mayfly.devices import Device, DeviceDriver, idempotency_key
from mayfly.devices.driver import CallLoop, CallOutcome, LoopedDriver
from mayfly.errors import DeviceActionError, DeviceUnavailableError

__all__ = ["DeviceCalls", "abandoned_answer"]

#: Threads of the shared pool at most: calls wait on the network, and a task
#: process has one call in flight at a time (16 task processes by default).
_POOL_THREADS = 64
#: Drivers kept per process (one per driver factory; a runtime has one).
_KEPT_DRIVERS = 2
_shared_lock = threading.Lock()
_shared_by_factory: OrderedDict[
    Callable[[], DeviceDriver], tuple[int, ThreadPoolExecutor, DeviceDriver]
] = OrderedDict()


def _shared(factory: Callable[[], DeviceDriver]) -> tuple[ThreadPoolExecutor, DeviceDriver]:
    """This process's pool and driver for ``factory``: made on first use, and
    again in a forked child (threads and sockets are not inherited usefully)."""
    with _shared_lock:
        found = _shared_by_factory.get(factory)
        if found is not None and found[0] == os.getpid():
            _shared_by_factory.move_to_end(factory)
            return found[1], found[2]
        pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="mayfly-device")
        driver = factory()
        _shared_by_factory[factory] = (os.getpid(), pool, driver)
        while len(_shared_by_factory) > _KEPT_DRIVERS:
            _, (pid, old_pool, old_driver) = _shared_by_factory.popitem(last=False)
            if pid == os.getpid():
                old_pool.shutdown(wait=False, cancel_futures=True)
                with contextlib.suppress(Exception):
                    old_driver.close()
        return pool, driver


class DeviceCalls:
    """Runs ``call`` frames against devices; results come back through :meth:`completed`.

    Args:
        driver_factory: makes the driver, once per process and factory, on the
            first call or :meth:`warm` (:func:`_shared`).
        request_id: part of every action's idempotency key.
        source: the request's source, part of the key too.
    """

    def __init__(
        self, driver_factory: Callable[[], DeviceDriver], request_id: str, *, source: str = ""
    ) -> None:
        self._driver_factory = driver_factory
        self._driver: DeviceDriver | None = None
        self._request_id, self._source = request_id, source
        self._pool: ThreadPoolExecutor | None = None
        self._futures: set[Future[None]] = set()
        self._by_token: dict[object, Future[None]] = {}
        self._done: queue.SimpleQueue[tuple[object, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop: CallLoop | None = None
        self._loop_answers: list[tuple[object, bytes]] = []
        # One descriptor for the coordinator's loop: the pipe, and the engine's epoll.
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        # Held while answering and while closing: an answer after close() must
        # not reach a pipe whose descriptor number another file may have now.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def fd(self) -> int:
        """Readable when a call may have news: then :meth:`completed`."""
        return self._epoll.fileno()

    def next_wake(self) -> float:
        """When to look at :meth:`completed` even if :attr:`fd` stays quiet (a
        timeout or a retry's wait falls due; a ``time.monotonic()`` value)."""
        return self._loop.next_wake() if self._loop is not None else float("inf")

    def submit(
        self,
        token: object,
        device: Device,
        frame: dict[str, Any],
        ordinals: dict[str, int],
        deadline: float,
    ) -> None:
        """Start the call in ``frame`` (checked) on ``device``, bounded by ``deadline``.

        ``ordinals`` counts the attempt's calls of each action name: the n-th call
        of a name carries the same idempotency key in every attempt and
        redelivery, so the device applies it once.
        """
        key: str | None = None
        if frame["op"] == "action":
            name = frame["name"]
            ordinal = ordinals.get(name, 0)
            ordinals[name] = ordinal + 1
            key = idempotency_key(self._request_id, device.id, name, ordinal, source=self._source)
        pool = self._pool_ready()
        if self._loop is not None and self._loop.serves(device):
            op = frame["op"]
            name, payload = (frame["name"], frame["payload"]) if op == "action" else (None, None)
            self._loop.start(token, device, op, name, payload, key, deadline, self._on_answer)
            return
        future = pool.submit(self._run, token, device, frame, key, deadline)
        self._futures.add(future)
        self._by_token[token] = future
        future.add_done_callback(self._futures.discard)

    def drop(self, token: object) -> None:
        """Forget the call of ``token`` (its attempt ended: killed, timed out): on
        the engine, nothing more of it is sent, a retry included; a call on a
        thread is dropped if not started yet, else it ends at its deadline,
        unheard."""
        future = self._by_token.pop(token, None)
        if future is not None:
            future.cancel()
        if self._loop is not None:
            self._loop.cancel(self._on_answer, token)
            self._loop_answers = [a for a in self._loop_answers if a[0] != token]

    def warm(self) -> None:
        """Have the driver and a first thread now: while the first task process
        starts (milliseconds the coordinator would spend waiting for its
        ``ready``), rather than on the request's first call. Starting a thread
        is about 1.5 ms here, waiting for it to run; a later request of the same
        process finds both there. A driver with a non-blocking engine needs no
        thread for the calls it serves."""
        pool = self._pool_ready()
        if self._loop is None:
            pool.submit(lambda: None)

    def _pool_ready(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool, self._driver = _shared(self._driver_factory)
            if isinstance(self._driver, LoopedDriver):
                self._loop = self._driver.call_loop()
                if self._loop is not None:
                    self._epoll.register(self._loop.fd, select.EPOLLIN)
        return self._pool

    def _on_answer(self, token: object, outcome: CallOutcome) -> None:
        self._loop_answers.append((token, _encoded(outcome)))

    def _call(
        self, device: Device, frame: dict[str, Any], key: str | None, deadline: float
    ) -> dict[str, Any]:
        assert self._driver is not None
        if key is None:
            return self._driver.state(device, deadline=deadline)
        return self._driver.action(device, frame["name"], frame["payload"], key, deadline=deadline)

    def _run(
        self, token: object, device: Device, frame: dict[str, Any], key: str | None, deadline: float
    ) -> None:
        outcome: CallOutcome | Exception
        try:
            outcome = self._call(device, frame, key, deadline)
        except Exception as exc:  # told to the package as a refusal, never raised here
            outcome = exc
        data = _encoded(outcome)
        with self._lock:
            if self._closed:
                return  # its request ended meanwhile: nobody waits for this answer
            self._done.put((token, data))
            with contextlib.suppress(BlockingIOError):  # a full pipe: the loop is woken
                os.write(self._wake_w, b"\0")

    def completed(self) -> list[tuple[object, bytes]]:
        """Calls finished since the last look: (token, encoded answer frame)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        if self._loop is not None:
            self._loop.pump()  # tells _on_answer
        found, self._loop_answers = self._loop_answers, []
        while True:
            try:
                answer = self._done.get_nowait()
            except queue.Empty:
                return found
            self._by_token.pop(answer[0], None)
            found.append(answer)

    def close(self) -> None:
        """Stop taking calls; calls not started are dropped, calls in flight end
        at their deadline, unheard. The pool and the driver stay for the
        process's next request."""
        for future in list(self._futures):
            future.cancel()
        if self._loop is not None:
            self._loop.cancel(self._on_answer)
            self._loop_answers.clear()
        with self._lock:
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._epoll.close()


def _encoded(outcome: CallOutcome | Exception) -> bytes:
    """The ``answer`` frame for a call's outcome: its value, or a refusal."""
    answer: dict[str, Any]
    if isinstance(outcome, DeviceUnavailableError):
        answer = _refusal("unavailable", outcome.reason)
    elif isinstance(outcome, DeviceActionError):
        answer = _refusal("refused", outcome.reason)
    elif isinstance(outcome, Exception):  # a driver bug: that call fails, never the coordinator
        answer = _refusal("unavailable", f"driver error: {type(outcome).__name__}: {outcome}")
    else:
        answer = {"t": "answer", "ok": True, "value": outcome}
    try:
        return encode(answer)
    except Exception as exc:  # too big, or not JSON: the package is told so
        size = len(json.dumps(answer, default=str)) if isinstance(exc, ValueError) else 0
        why = (
            f"the device's answer of {size} bytes exceeds {MAX_FRAME_BYTES}"
            if size
            else f"the device's answer cannot be passed on: {str(exc)[:200]}"
        )
        return encode(_refusal("refused", why))


def abandoned_answer(reason: str) -> bytes:
    """The ``answer`` frame of a call given up by the coordinator (its request
    was canceled): the package sees the device as unavailable, with ``reason``."""
    return encode(_refusal("unavailable", reason))


def _refusal(kind: str, reason: str) -> dict[str, Any]:
    return {"t": "answer", "ok": False, "kind": kind, "reason": reason[:2000]}
