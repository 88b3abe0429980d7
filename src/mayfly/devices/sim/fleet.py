"""The simulated fleet: device state machines, idempotency records, injected failures.

This module does no I/O: :mod:`mayfly.devices.sim.server` puts it on HTTP.
Every request is one synchronous call that returns a :class:`SimResponse`, so
the same fleet serves HTTP, and tests can drive it directly.

Time-based state (a reboot that ends, a download that progresses) is computed
from timestamps when a device is next looked at, never with timers: ten
thousand devices cost ten thousand small objects and no tasks.
"""

from __future__ import annotations

import copy
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mayfly.devices.inventory import Device, Inventory

__all__ = [
    "ACTIONS",
    "CAPABILITIES",
    "INITIAL_FIRMWARE",
    "SimResponse",
    "Simulator",
    "device_ids",
    "render_answer",
]

Json = dict[str, Any]

#: Actions a simulated device understands, as the last segment of its action URL.
ACTIONS = ("reboot", "firmware-download", "firmware-install", "config-push")
#: Capabilities every simulated device advertises in the inventory.
CAPABILITIES = ("reboot", "firmware", "config")
#: The firmware every device runs after construction or a reset.
INITIAL_FIRMWARE = "1.0.0"

_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Largest answer template of a declared action, encoded.
MAX_TEMPLATE_BYTES = 64 * 1024
#: A template value that is this string whole is replaced by the request's body.
PAYLOAD_MARK = "$payload"
_SITES = ("lab-a", "lab-b", "lab-c")
_MODELS = ("m1", "m2")
_REPLAYED = ("Idempotent-Replayed", "true")


@dataclass(frozen=True)
class SimResponse:
    """One answer of a simulated device: HTTP status, JSON body, extra headers."""

    status: int
    body: Json
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str, *headers: tuple[str, str]) -> SimResponse:
    return SimResponse(status, {"error": message}, headers)


_INJECTED = _error(503, "injected failure")
_FAULT = _error(500, "device fault")


def render_answer(template: Any, device_id: str, action: str, payload: Json) -> Any:
    """A declared action's answer: ``template`` with ``{device_id}`` and
    ``{action}`` filled in its strings, and a value of ``"$payload"`` replaced
    by the request's body."""
    if isinstance(template, str):
        if template == PAYLOAD_MARK:
            return copy.deepcopy(payload)
        return template.replace("{device_id}", device_id).replace("{action}", action)
    if isinstance(template, dict):
        return {k: render_answer(v, device_id, action, payload) for k, v in template.items()}
    if isinstance(template, list):
        return [render_answer(v, device_id, action, payload) for v in template]
    return template


def _declared(actions: Any, capabilities: Iterable[str]) -> tuple[dict[str, Json], tuple[str, ...]]:
    """Declared actions and capabilities, checked.

    Raises:
        ValueError: a name that is no action or capability name, a built-in
            action, a template that is not a JSON object or is over its bound.
    """
    import json

    declared: dict[str, Json] = {}
    for name, template in dict(actions or {}).items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"action name {str(name)[:70]!r}: letters, digits, '.', '_', '-'")
        if name in ACTIONS:
            raise ValueError(f"action {name!r} is built in; declare another name")
        if not isinstance(template, dict):
            raise ValueError(f"action {name!r}: its answer template must be a JSON object")
        if len(json.dumps(template)) > MAX_TEMPLATE_BYTES:
            raise ValueError(f"action {name!r}: answer template over {MAX_TEMPLATE_BYTES} bytes")
        declared[name] = copy.deepcopy(template)
    caps = tuple(dict.fromkeys(capabilities))
    for cap in caps:
        if not isinstance(cap, str) or not _NAME.match(cap):
            raise ValueError(f"capability {str(cap)[:70]!r}: letters, digits, '.', '_', '-'")
    return declared, caps


def device_ids(count: int) -> list[str]:
    """Ids ``sim-0001``..: zero-padded to at least four digits, so they sort."""
    width = max(4, len(str(count)))
    return [f"sim-{n:0{width}d}" for n in range(1, count + 1)]


def _initial_config() -> Json:
    return {"ntp_server": "pool.ntp.org", "log_level": "info", "telemetry_interval_s": 60}


@dataclass
class _SimDevice:
    """One device's mutable state. Guarded by the owning simulator's lock.

    ``config`` is replaced, never mutated in place, so a state body may hand
    it out without a copy and still be a snapshot.
    """

    id: str
    labels: dict[str, str]
    broken: bool
    booted_at: float
    boot_count: int = 1
    version: str = INITIAL_FIRMWARE
    staged: str | None = None
    pending: str | None = None
    downloading: str | None = None
    download_started: float = 0.0
    rebooting_until: float | None = None
    config: Json = field(default_factory=_initial_config)
    log: list[Json] = field(default_factory=list)
    arrivals: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    replies: dict[str, SimResponse] = field(default_factory=dict)
    last_request_at: float | None = None
    """Wall-clock time of the last request that reached it (any request)."""

    def settle(self, now: float, download_time: float) -> None:
        """Bring timed transitions up to ``now``: finished downloads, finished reboots."""
        if self.downloading is not None and now >= self.download_started + download_time:
            self.staged, self.downloading = self.downloading, None
        if self.rebooting_until is not None and now >= self.rebooting_until:
            self.boot_count += 1
            self.booted_at, self.rebooting_until = self.rebooting_until, None
            if self.pending is not None:
                # The installed image becomes the running one; its staging slot is spent.
                self.version, self.pending, self.staged = self.pending, None, None

    def progress(self, now: float, download_time: float) -> int:
        if self.downloading is not None:
            # 100 is kept for "staged", so a client waiting on it sees one signal.
            return min(99, int(100 * (now - self.download_started) / download_time))
        return 100 if self.staged is not None else 0

    def state(self, now: float, download_time: float) -> Json:
        rebooting = self.rebooting_until is not None
        return {
            "id": self.id,
            "status": "rebooting" if rebooting else "online",
            "firmware": {
                "version": self.version,
                "staged": self.staged,
                "download_progress": self.progress(now, download_time),
                "pending": self.pending,
            },
            "config": self.config,
            "boot_count": self.boot_count,
            "uptime_s": 0.0 if rebooting else round(now - self.booted_at, 3),
            "labels": self.labels,
        }


def _version_of(payload: Json) -> str | SimResponse:
    version = payload.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        return _error(422, f"version must be a string like 1.2.3, got {version!r}")
    return version


class Simulator:
    """A fleet of simulated devices speaking the device protocol.

    Thread-safe: one lock guards every device and counter, and is never held
    across an ``await``, so a test thread may read records while the server's
    loop thread serves.

    Args:
        count: number of devices (at least 1).
        port: port a server should bind by default (0: any free port).
        reboot_time: seconds a device stays unavailable after ``reboot``.
        download_time: seconds a firmware download takes from 0 to 100 %.
        latency_ms: delay added to every device request.
        jitter_ms: extra delay, uniform in ``[0, jitter_ms]``, per request.
        failure_rate: fraction of device requests answered 503 before anything
            is done.
        broken: fraction of devices (chosen by ``seed``) or explicit ids that
            answer 500 to every action while their state still answers.
        seed: makes failures, jitter and the broken set reproducible.
        actions: more actions every device understands, each a name and its
            answer template (a JSON object: ``{device_id}`` and ``{action}``
            filled in its strings, ``"$payload"`` as a value replaced by the
            request's body); applied ones are in the device's log like any.
        capabilities: more capabilities every device advertises.
        clock: monotonic seconds; tests pass a fake one to step time.
        wall_clock: epoch seconds stamped on log entries.

    Raises:
        ValueError: an argument out of range, or a broken id not in the fleet.
    """

    def __init__(
        self,
        count: int,
        *,
        port: int = 0,
        reboot_time: float = 0.3,
        download_time: float = 0.5,
        latency_ms: float = 0.0,
        jitter_ms: float = 0.0,
        failure_rate: float = 0.0,
        broken: float | Iterable[str] = 0.0,
        seed: int = 0,
        actions: dict[str, Json] | None = None,
        capabilities: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        for name, value in (
            ("reboot_time", reboot_time),
            ("download_time", download_time),
            ("latency_ms", latency_ms),
            ("jitter_ms", jitter_ms),
        ):
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in 0..1, got {failure_rate}")
        self.actions, extra = _declared(actions, capabilities)
        self.capabilities = tuple(dict.fromkeys((*CAPABILITIES, *extra)))
        self.count = count
        self.port = port
        self.reboot_time = reboot_time
        self.download_time = download_time
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.failure_rate = failure_rate
        self.seed = seed
        self._clock = clock
        self._wall_clock = wall_clock
        self._ids = device_ids(count)
        self.broken_ids: tuple[str, ...] = self._choose_broken(broken)
        self._base_url: str | None = None
        self._lock = threading.Lock()
        self._reset_locked()

    # -- construction -----------------------------------------------------

    def _choose_broken(self, broken: float | Iterable[str]) -> tuple[str, ...]:
        if isinstance(broken, bool):
            raise ValueError("broken must be a fraction in 0..1 or device ids, not a bool")
        if isinstance(broken, int | float):
            if not 0.0 <= broken <= 1.0:
                raise ValueError(f"broken must be a fraction in 0..1 or device ids, got {broken}")
            # A positive fraction breaks at least one device, so the failure is observable.
            k = 0 if broken == 0 else max(1, math.floor(broken * self.count + 0.5))
            # Seeded with a string: stable across runs and Python versions.
            rng = random.Random(f"mayfly-sim-broken-{self.seed}")  # noqa: S311 - a simulation
            return tuple(sorted(rng.sample(self._ids, k)))
        if isinstance(broken, str):
            raise ValueError("broken ids must be an iterable of ids, not one string")
        chosen = sorted(set(broken))
        known = set(self._ids)
        unknown = [i for i in chosen if i not in known]
        if unknown:
            raise ValueError(f"broken names devices not in the fleet: {', '.join(unknown)}")
        return tuple(chosen)

    def _reset_locked(self) -> None:
        now = self._clock()
        broken = set(self.broken_ids)
        canaries = -(-self.count // 20)  # the first 5 %, rounded up, in integers
        self._devices: dict[str, _SimDevice] = {}
        for index, device_id in enumerate(self._ids):
            labels = {
                "site": _SITES[index % len(_SITES)],
                "model": _MODELS[index % len(_MODELS)],
                "ring": "canary" if index < canaries else "main",
            }
            self._devices[device_id] = _SimDevice(
                device_id, labels, device_id in broken, booted_at=now
            )
        # Seeded, reproducible randomness for a simulation: nothing secret depends on it.
        self._failure_rng = random.Random(self.seed)  # noqa: S311
        self._jitter_rng = random.Random(f"mayfly-sim-jitter-{self.seed}")  # noqa: S311
        self._requests = self._applied = self._replayed = 0
        self._injected = self._unavailable = self._faults = 0

    def reset(self) -> None:
        """Every device back to its first boot; logs, arrivals and counters cleared."""
        with self._lock:
            self._reset_locked()

    # -- inventory --------------------------------------------------------

    def bind(self, base_url: str | None) -> None:
        """Record where a server serves this fleet (``None`` when it stops)."""
        self._base_url = base_url.rstrip("/") if base_url else None

    @property
    def base_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` while a server serves this fleet."""
        return self._base_url

    def device_ids(self) -> list[str]:
        """Every device id, in order."""
        return list(self._ids)

    def inventory(self, base_url: str | None = None) -> Inventory:
        """The fleet as an inventory whose addresses point at ``base_url``.

        Raises:
            RuntimeError: no ``base_url`` given and no server is serving.
        """
        base = (base_url or self._base_url or "").rstrip("/")
        if not base:
            raise RuntimeError("the simulator is not serving: pass base_url or start a server")
        return Inventory(
            Device(
                id=d.id,
                address=f"{base}/devices/{d.id}",
                labels=dict(d.labels),
                capabilities=self.capabilities,
            )
            for d in self._devices.values()
        )

    # -- the device protocol ----------------------------------------------

    def delay(self) -> float:
        """Seconds to wait before answering one device request."""
        if self.jitter_ms:
            return (self.latency_ms + self._jitter_rng.uniform(0, self.jitter_ms)) / 1000
        return self.latency_ms / 1000

    def _inject(self) -> bool:
        if self.failure_rate and self._failure_rng.random() < self.failure_rate:
            self._injected += 1
            return True
        return False

    def _rebooting(self, device: _SimDevice, now: float) -> SimResponse | None:
        if device.rebooting_until is None:
            return None
        self._unavailable += 1
        wait = max(1, math.ceil(device.rebooting_until - now))
        return _error(503, "rebooting", ("Retry-After", str(wait)))

    def state(self, device_id: str) -> SimResponse:
        """``GET /devices/{id}/state``."""
        with self._lock:
            self._requests += 1
            device = self._devices.get(device_id)
            if device is None:
                return _error(404, f"unknown device {device_id}")
            device.last_request_at = self._wall_clock()
            if self._inject():
                return _INJECTED
            now = self._clock()
            device.settle(now, self.download_time)
            busy = self._rebooting(device, now)
            return busy or SimResponse(200, device.state(now, self.download_time))

    def action(self, device_id: str, name: str, payload: Any, key: str | None) -> SimResponse:
        """``POST /devices/{id}/actions/{name}`` with an ``Idempotency-Key``.

        The first arrival of a key that the device applies stores the answer;
        later arrivals of that key replay it and apply nothing. Refused
        requests (4xx) are not stored: they changed nothing, so a retry once
        the cause is gone is judged afresh.
        """
        with self._lock:
            self._requests += 1
            device = self._devices.get(device_id)
            if device is None:
                return _error(404, f"unknown device {device_id}")
            if name not in ACTIONS and name not in self.actions:
                known = ", ".join((*ACTIONS, *self.actions))
                return _error(404, f"unknown action {name[:80]!r}; known: {known}")
            device.last_request_at = self._wall_clock()
            if not key:
                return _error(400, "missing Idempotency-Key header")
            device.arrivals[key] = device.arrivals.get(key, 0) + 1
            now = self._clock()
            device.settle(now, self.download_time)
            if self._inject():
                return self._reject(device, key, _INJECTED)
            busy = self._rebooting(device, now)
            if busy is not None:
                return self._reject(device, key, busy)
            stored = device.replies.get(key)
            if stored is not None:
                self._replayed += 1
                return replace(stored, headers=(*stored.headers, _REPLAYED))
            if device.broken:
                self._faults += 1
                return self._reject(device, key, _FAULT)
            if not isinstance(payload, dict):
                return _error(422, "body must be a JSON object")
            response = self._apply(device, name, payload, now)
            if 200 <= response.status < 300:
                device.replies[key] = response
                entry = {"action": name, "key": key, "payload": copy.deepcopy(payload)}
                device.log.append({**entry, "at": self._wall_clock()})
                self._applied += 1
            return response

    @staticmethod
    def _reject(device: _SimDevice, key: str, response: SimResponse) -> SimResponse:
        device.rejected[key] = device.rejected.get(key, 0) + 1
        return response

    def _apply(self, device: _SimDevice, name: str, payload: Json, now: float) -> SimResponse:
        template = self.actions.get(name)
        if template is not None:
            return SimResponse(200, render_answer(template, device.id, name, payload))
        if name == "reboot":
            # A partial download does not survive a reboot; a staged image does.
            device.downloading = None
            device.rebooting_until = now + self.reboot_time
            body = {"action": name, "accepted": True, "boot_count": device.boot_count}
            return SimResponse(200, body)
        if name == "config-push":
            return self._config_push(device, payload)
        version = _version_of(payload)
        if isinstance(version, SimResponse):
            return version
        if name == "firmware-install":
            if device.staged != version:
                return _error(409, f"version {version} not staged")
            device.pending = version
            return SimResponse(200, {"action": name, "accepted": True, "pending": version})
        # firmware-download: asking again for what is staged or downloading changes nothing.
        if version not in (device.staged, device.downloading):
            device.staged, device.downloading, device.download_started = None, version, now
            device.settle(now, self.download_time)
        progress = device.progress(now, self.download_time)
        body = {"action": name, "accepted": True, "version": version, "download_progress": progress}
        return SimResponse(202, body)

    @staticmethod
    def _config_push(device: _SimDevice, payload: Json) -> SimResponse:
        config, mode = payload.get("config"), payload.get("mode", "merge")
        if not isinstance(config, dict):
            return _error(422, "config must be a JSON object")
        if mode not in ("merge", "replace"):
            return _error(422, f"mode must be 'merge' or 'replace', got {mode!r}")
        # Merge is shallow: a pushed key replaces that key's whole value.
        base = device.config if mode == "merge" else {}
        device.config = {**base, **copy.deepcopy(config)}
        return SimResponse(200, {"action": "config-push", "config": device.config})

    # -- records for tests and benchmarks ---------------------------------

    def records(self, device_id: str) -> Json:
        """What really happened on one device: state, applied log, key arrivals,
        and when a request last reached it (``last_request_at``, wall clock).

        ``rejected`` counts, per key, the arrivals answered 5xx without being
        looked at (injected failure, rebooting, device fault).

        Raises:
            KeyError: no such device.
        """
        with self._lock:
            device = self._devices[device_id]
            now = self._clock()
            device.settle(now, self.download_time)
            return copy.deepcopy(
                {
                    "state": device.state(now, self.download_time),
                    "log": device.log,
                    "arrivals": device.arrivals,
                    "rejected": device.rejected,
                    "broken": device.broken,
                    "last_request_at": device.last_request_at,
                }
            )

    def log(self) -> dict[str, list[Json]]:
        """Every device's applied actions, in the order applied."""
        with self._lock:
            return {d.id: copy.deepcopy(d.log) for d in self._devices.values()}

    def summary(self) -> Json:
        """Fleet-wide counters and the firmware versions running now."""
        with self._lock:
            now = self._clock()
            firmware: Counter[str] = Counter()
            for device in self._devices.values():
                device.settle(now, self.download_time)
                firmware[device.version] += 1
            return {
                "devices": self.count,
                "requests": self._requests,
                "applied": self._applied,
                "replayed": self._replayed,
                "injected_failures": self._injected,
                "unavailable": self._unavailable,
                "faults": self._faults,
                "broken": list(self.broken_ids),
                "firmware": dict(sorted(firmware.items())),
            }

    def duplicates(self) -> list[Json]:
        """(device, key) pairs applied more than once: a self-check, always empty."""
        with self._lock:
            found = []
            for device in self._devices.values():
                counts = Counter(entry["key"] for entry in device.log)
                found += [
                    {"device": device.id, "key": key, "applied": n}
                    for key, n in sorted(counts.items())
                    if n > 1
                ]
            return found
