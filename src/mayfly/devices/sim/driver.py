"""The embedded device driver: the simulator's fleet, called in-process, no HTTP.

:class:`SimulatorDriver` is :class:`~mayfly.devices.http.HttpDriver` itself with
another :class:`~mayfly.devices.http.Transport`: each exchange goes straight to
a :class:`~mayfly.devices.sim.fleet.Simulator` instead of onto a socket. The
driver's retries, backoff with jitter, ``Retry-After`` and deadline rules, the
errors from ``mayfly.errors`` and their messages are therefore the very same
code; the transport only answers what the simulator's HTTP server would answer:

- the route the server would match (``GET /state``, ``POST /actions/{name}``,
  or a plain 404 with no error field, as for ``POST /actions/``);
- the simulator's status, its extra headers (``Retry-After``...), its reason
  phrase and its JSON body encoded as the server encodes it, so a caller gets
  a fresh object (and a payload is decoded afresh per attempt, tuples as lists);
- an idempotency key the device already applied replays the first answer
  (the simulator keeps the records, exactly as behind its HTTP server).

``tests/devices/test_driver_contract.py`` runs one contract against both drivers.

What cannot be mirrored, because there is no connection:

- connect timeouts, refused or reset connections, proxies and TLS: the
  embedded fleet is always reachable, so ``connect_timeout`` and ``pool_size``
  are accepted (a drop-in for ``HttpDriver(...)``) and checked, but unused;
- read timeouts: there is no socket to time out, so they are derived from the
  simulator's injected latency, with the outcome its HTTP server gives (a
  timed-out action is not applied), see :meth:`_SimulatorTransport.send`;
- header encoding corner cases beyond the validity check ``requests`` makes
  on each header value (the same check, called here);
- a name that quoting and the server's URL decoding would not round-trip
  (the transport decodes with ``urllib.parse.unquote``, the server with yarl).

A driver acts on the very ``Simulator`` object it was given, so it is only
useful in the process that holds that object. The coordinator's task
processes are forked: there each one would act on its own copy of the fleet,
unseen by the parent and by its siblings (a retry in a new process would even
apply a key again). Calls from a forked process therefore raise
``RuntimeError`` instead of silently diverging (the transport checks before
each attempt reaches the fleet; a call that fails before any attempt, a passed
deadline or a payload that is not JSON, fails as it would anywhere); to run a
coordinator against the simulator, serve it with ``SimulatorServer`` and use
``HttpDriver``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import requests
from requests.structures import CaseInsensitiveDict
from requests.utils import check_header_validity

from mayfly.devices.http import HttpDriver
from mayfly.devices.inventory import Device
from mayfly.devices.sim.fleet import SimResponse, Simulator

__all__ = ["SimulatorDriver"]

# The process that first used each simulator with a driver: see _check_process.
_OWNERS: weakref.WeakKeyDictionary[Simulator, int] = weakref.WeakKeyDictionary()
_OWNERS_LOCK = threading.Lock()

_ACTIONS = "/actions/"


def _claim(simulator: Simulator) -> int:
    with _OWNERS_LOCK:
        return _OWNERS.setdefault(simulator, os.getpid())


class SimulatorDriver(HttpDriver):
    """A thread-safe :class:`~mayfly.devices.driver.DeviceDriver` over an in-process fleet.

    The simulated device is the one whose id is ``device.id``; ``device.address``
    is not looked at (``HttpDriver`` reaches whatever the address names: for a
    ``Simulator.inventory()`` entry that is the same device).

    Args:
        simulator: the fleet to act on.
        options: the keyword arguments of ``HttpDriver`` but ``transport``, with
            the same defaults and checks. ``read_timeout`` bounds the injected
            latency (``Simulator.delay()``): a request whose latency reaches it
            fails as a read timeout. ``connect_timeout`` and ``pool_size`` are
            unused: there is no connection. Injected latency is waited with
            ``time.sleep``, as the network would; ``sleep`` waits between attempts.

    Use :meth:`factory` where a zero-argument driver factory is wanted, e.g.
    ``Coordinator(driver_factory=...)`` (but see the module's note on forking).
    """

    def __init__(self, simulator: Simulator, **options: Any) -> None:
        super().__init__(transport=_SimulatorTransport(simulator), **options)
        self._simulator = simulator

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


class _SimAnswer:
    """A simulator's answer as ``HttpDriver`` reads a response off the wire."""

    __slots__ = ("content", "headers", "reason", "status_code")

    def __init__(self, answer: SimResponse) -> None:
        self.status_code = answer.status
        try:
            self.reason = HTTPStatus(answer.status).phrase
        except ValueError:
            self.reason = ""
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(answer.headers)
        # Encoded as the server encodes it: the caller gets its own object,
        # never the simulator's, and only JSON types.
        self.content = json.dumps(answer.body).encode()


# What the server's router answers to a path it has no route for (POST /actions/):
# aiohttp's plain-text 404, no error field.
_NO_ROUTE = _SimAnswer(SimResponse(404, {}))


class _SimulatorTransport:
    """The :class:`~mayfly.devices.http.Transport` of :class:`SimulatorDriver`."""

    def __init__(self, simulator: Simulator) -> None:
        self._simulator = simulator
        self._owner_pid = _claim(simulator)

    def send(
        self,
        device: Device,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: tuple[float, float],
    ) -> _SimAnswer:
        """One request: the simulator's answer, or ``requests.ReadTimeout``.

        The server waits ``Simulator.delay()`` before anything else, then
        (for an action) reads the body, then lets the fleet decide; so does
        this. A delay that reaches the read timeout is a read timeout: the
        wait is cut there and there is no answer. By then the client has closed
        the connection, so the server's body read fails and a timed-out action
        never reaches the fleet (a retry with its key is its first arrival).
        A timed-out state read does reach it, ``delay`` after it was sent
        (counted, and drawing its injected-failure chance); here it reaches it
        when the wait is cut, which keeps the order of arrivals the same.
        """
        self._check_process()
        for header in headers.items():
            # What requests checks before sending: HttpDriver reports its words.
            check_header_validity(header)
        sim = self._simulator
        if method == "GET" and path == "/state":
            if self._latency_reaches(timeout[1]):
                sim.state(device.id)
                raise requests.ReadTimeout(f"{method} {path}: injected latency")
            return _SimAnswer(sim.state(device.id))
        if method == "POST" and path.startswith(_ACTIONS) and len(path) > len(_ACTIONS):
            if self._latency_reaches(timeout[1]):
                raise requests.ReadTimeout(f"{method} {path}: injected latency")
            name = unquote(path[len(_ACTIONS) :])
            payload = json.loads(body or b"{}")  # decoded afresh: the simulator keeps it
            key = headers.get("Idempotency-Key")
            return _SimAnswer(sim.action(device.id, name, payload, key))
        return _NO_ROUTE

    def close(self) -> None:
        """Nothing to release."""

    def _latency_reaches(self, read: float) -> bool:
        """Waits the injected latency, cut at ``read``; True when it reaches ``read``."""
        delay = self._simulator.delay()
        if delay >= read:
            time.sleep(read)
            return True
        if delay > 0:
            time.sleep(delay)
        return False

    def _check_process(self) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                "SimulatorDriver used in a forked process: it would act on a copy of the "
                "simulator; serve the simulator with SimulatorServer and use HttpDriver"
            )
