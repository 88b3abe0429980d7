"""The embedded device driver: the simulator's fleet, called in-process, no HTTP.

:class:`SimulatorDriver` is the embedded twin of
:class:`~mayfly.devices.http.HttpDriver`. It hands each call straight to a
:class:`~mayfly.devices.sim.fleet.Simulator` and reads the simulator's answer
the way ``HttpDriver`` reads the same answer off the wire, so a caller sees the
same return values and the same errors from ``mayfly.errors``:

- 2xx: the JSON body, as a fresh object (encoded and decoded like on the wire);
- 4xx other than 429 (unknown device or action, bad payload, missing key,
  firmware not staged): :class:`~mayfly.errors.DeviceActionError` at once,
  with the same message (``POST /actions/x: 404 Not Found: ...``);
- 429 or 5xx (injected failure, rebooting, broken device): retried with the
  same backoff, jitter, ``Retry-After`` and deadline rules, then
  :class:`~mayfly.errors.DeviceUnavailableError` with the same message;
- an idempotency key the device already applied replays the first answer
  (the simulator keeps the records, exactly as behind its HTTP server).

``tests/devices/test_driver_contract.py`` runs one contract against both drivers.

What cannot be mirrored, because there is no connection:

- connect timeouts, refused or reset connections, proxies and TLS: the
  embedded fleet is always reachable, so ``connect_timeout`` and ``pool_size``
  are accepted (a drop-in for ``HttpDriver(...)``) and checked, but unused;
- read timeouts: there is no socket to time out, so they are derived from the
  simulator's injected latency, with the outcome its HTTP server gives (a
  timed-out action is not applied), see :meth:`SimulatorDriver._exchange`;
- header encoding corner cases beyond the validity check ``requests`` makes
  on the ``Idempotency-Key`` value (the same check, called here);
- a name that quoting and the server's URL decoding would not round-trip
  (the simulator gets ``name`` as is).

A driver acts on the very ``Simulator`` object it was given, so it is only
useful in the process that holds that object. The coordinator's task
processes are forked: there each one would act on its own copy of the fleet,
unseen by the parent and by its siblings (a retry in a new process would even
apply a key again). Calls from a forked process therefore raise
``RuntimeError`` instead of silently diverging; to run a coordinator against
the simulator, serve it with ``SimulatorServer`` and use ``HttpDriver``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import requests
from requests.utils import check_header_validity

from mayfly.devices.http import _parse_retry_after
from mayfly.devices.inventory import Device
from mayfly.devices.sim.fleet import SimResponse, Simulator
from mayfly.errors import DeviceActionError, DeviceUnavailableError

__all__ = ["SimulatorDriver"]

_log = logging.getLogger(__name__)

# As HttpDriver: statuses whose Retry-After is honoured.
_RETRY_AFTER_STATUSES = frozenset({429, 503})

# The process that first used each simulator with a driver: see _check_process.
_OWNERS: weakref.WeakKeyDictionary[Simulator, int] = weakref.WeakKeyDictionary()
_OWNERS_LOCK = threading.Lock()


def _claim(simulator: Simulator) -> int:
    with _OWNERS_LOCK:
        return _OWNERS.setdefault(simulator, os.getpid())


class SimulatorDriver:
    """A thread-safe :class:`~mayfly.devices.driver.DeviceDriver` over an in-process fleet.

    The simulated device is the one whose id is ``device.id``; ``device.address``
    is not looked at (``HttpDriver`` reaches whatever the address names: for a
    ``Simulator.inventory()`` entry that is the same device).

    Args:
        simulator: the fleet to act on.
        connect_timeout: accepted for parity with ``HttpDriver``; there is no
            connection to wait for.
        read_timeout: seconds to wait for an answer: a request whose injected
            latency (``Simulator.delay()``) reaches it fails as a read timeout.
        retries, backoff, max_backoff, max_retry_after: as ``HttpDriver``.
        pool_size: accepted and checked for parity with ``HttpDriver``; unused.
        sleep: called to wait between attempts; tests inject a recorder.
            Injected latency is waited with ``time.sleep``, as the network would.

    Use :meth:`factory` where a zero-argument driver factory is wanted, e.g.
    ``Coordinator(driver_factory=...)`` (but see the module's note on forking).
    """

    def __init__(
        self,
        simulator: Simulator,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_retry_after: float = 10.0,
        pool_size: int = 64,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0 or pool_size < 1:
            raise ValueError("retries must be >= 0 and pool_size >= 1")
        self._simulator = simulator
        self._owner_pid = _claim(simulator)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._attempts = retries + 1
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._max_retry_after = max_retry_after
        self._sleep = sleep

    @classmethod
    def factory(cls, simulator: Simulator, **options: Any) -> Callable[[], SimulatorDriver]:
        """A zero-argument callable making drivers over ``simulator``, like ``HttpDriver``.

        ``options`` are the keyword arguments of the constructor, checked now.
        """
        cls(simulator, **options)  # fail here, not in whoever calls the factory
        return lambda: cls(simulator, **options)

    @property
    def simulator(self) -> Simulator:
        """The fleet this driver acts on."""
        return self._simulator

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        """The device's current state, as ``HttpDriver.state`` reads it.

        Raises:
            DeviceUnavailableError: 5xx or 429 after retries, a read timeout
                (injected latency), or the deadline passed.
            DeviceActionError: a 4xx (unknown device).
        """
        sim = self._simulator
        return self._call(device, "GET /state", lambda: sim.state(device.id), deadline)

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Ask the device to perform ``name``; its answer. As ``HttpDriver.action``.

        Raises:
            DeviceUnavailableError: 5xx or 429 after retries, a read timeout
                (injected latency), the deadline passed, or an
                ``idempotency_key`` that is not a valid header value.
            DeviceActionError: the device refused (4xx) or the payload is not JSON.
        """
        what = f"POST /actions/{quote(name, safe='')}"
        try:
            # The same encoding as HttpDriver, then decoded as the server does, so
            # the simulator sees what it would see over HTTP (tuples as lists...).
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DeviceActionError(device.id, f"{what}: payload is not JSON: {exc}") from exc
        sim = self._simulator

        def before_sending() -> None:
            # What HttpDriver learns on its first attempt before the device looks.
            try:
                check_header_validity(("Idempotency-Key", idempotency_key))
            except requests.RequestException as exc:
                raise DeviceUnavailableError(device.id, f"{what}: {exc}") from exc
            if not name:
                # POST /actions/ matches no route of the server: a plain 404, no error field.
                raise DeviceActionError(device.id, f"{what}: 404 Not Found")

        def exchange() -> SimResponse:
            # Decoded afresh per attempt: the simulator keeps what it is given.
            return sim.action(device.id, name, json.loads(body), idempotency_key)

        return self._call(
            device, what, exchange, deadline, before_sending=before_sending, reads_body=True
        )

    def close(self) -> None:
        """Nothing to release; safe to call more than once."""

    # -- the retry loop, HttpDriver._call without the socket ----------------

    def _call(
        self,
        device: Device,
        what: str,
        exchange: Callable[[], SimResponse],
        deadline: float | None,
        *,
        before_sending: Callable[[], None] | None = None,
        reads_body: bool = False,
    ) -> dict[str, Any]:
        self._check_process()
        failure = ""
        for attempt in range(1, self._attempts + 1):
            read = self._read_timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeviceUnavailableError(device.id, f"deadline passed before {what}")
                read = min(read, remaining)
            if before_sending is not None:
                before_sending()
            retry_after: float | None = None
            answer = self._exchange(exchange, read, reads_body=reads_body)
            if answer is None:
                failure = "read timeout"
            else:
                status = answer.status
                if 200 <= status < 300:
                    return _json_object(device, what, answer)
                if status != 429 and status < 500:
                    raise DeviceActionError(device.id, _refusal(what, answer))
                error = _device_error(answer)
                failure = f"{status} ({error})" if error else str(status)
                if status in _RETRY_AFTER_STATUSES:
                    retry_after = _parse_retry_after(_header(answer, "Retry-After"))
            if attempt == self._attempts:
                break
            if retry_after is not None:
                delay = min(retry_after, self._max_retry_after)
            else:
                delay = min(self._backoff * 2 ** (attempt - 1), self._max_backoff)
                delay += random.uniform(0, delay / 10)  # noqa: S311 - jitter, not crypto
            if deadline is not None and time.monotonic() + delay >= deadline:
                message = f"deadline passed: {what}: {failure} after {attempt} attempt(s)"
                raise DeviceUnavailableError(device.id, message)
            _log.debug(
                "device %s: %s: %s; retry %d of %d in %.2fs",
                device.id, what, failure, attempt, self._attempts - 1, delay,
            )  # fmt: skip
            self._sleep(delay)
        message = f"{what}: {failure} after {self._attempts} attempts"
        raise DeviceUnavailableError(device.id, message)

    def _exchange(
        self, exchange: Callable[[], SimResponse], read: float, *, reads_body: bool
    ) -> SimResponse | None:
        """One request: the simulator's answer, or None for a read timeout.

        The server waits ``Simulator.delay()`` before anything else, then
        (for an action) reads the body, then lets the fleet decide; so does
        this. A delay that reaches ``read`` is a read timeout: the wait is cut
        at ``read`` and there is no answer. By then the client has closed the
        connection, so the server's body read fails and a timed-out action
        never reaches the fleet (a retry with its key is its first arrival).
        A timed-out state read does reach it, ``delay`` after it was sent
        (counted, and drawing its injected-failure chance); here it reaches it
        when the wait is cut, which keeps the order of arrivals the same.
        """
        delay = self._simulator.delay()
        if delay >= read:
            time.sleep(read)
            if not reads_body:
                exchange()
            return None
        if delay > 0:
            time.sleep(delay)
        return exchange()

    def _check_process(self) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                "SimulatorDriver used in a forked process: it would act on a copy of the "
                "simulator; serve the simulator with SimulatorServer and use HttpDriver"
            )


def _header(answer: SimResponse, name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in answer.headers if k.lower() == wanted), None)


def _json_object(device: Device, what: str, answer: SimResponse) -> dict[str, Any]:
    # Through JSON, as the server sends it: the caller gets its own object,
    # never the simulator's, and only JSON types.
    value = json.loads(json.dumps(answer.body))
    if isinstance(value, dict):
        return value
    problem = f"{type(value).__name__}, not an object"
    raise DeviceActionError(
        device.id, f"{what}: malformed JSON answer ({answer.status}): {problem}"
    )


def _device_error(answer: SimResponse) -> str | None:
    """The ``error`` field of an answer, truncated as ``HttpDriver`` truncates it."""
    error = answer.body.get("error")
    return str(error)[:200] if error else None


def _refusal(what: str, answer: SimResponse) -> str:
    try:
        reason = HTTPStatus(answer.status).phrase
    except ValueError:
        reason = ""
    message = f"{what}: {answer.status} {reason}".rstrip()
    error = _device_error(answer)
    return f"{message}: {error}" if error else message
