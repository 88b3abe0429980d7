"""What package code receives: the task context and the device handle.

This is the whole API a task package sees (documented in taskpkgs/README.md)::

    def run(ctx):
        ctx.device.id, ctx.device.labels
        ctx.device.state()                      -> dict
        ctx.device.action(name, payload=None)   -> dict   (idempotent, keyed)
        ctx.device.wait_until(predicate, timeout_s, interval_s=0.1, on_state=None) -> dict
        ctx.params                              validated request params
        ctx.log                                 logging.Logger-like, tagged with request and device
        ctx.progress(percent, message="")
        ctx.cancelled()                         True once the attempt should stop
        ctx.request_id, ctx.attempt

It runs inside the task process, never in the coordinator itself; the
device calls go through the coordinator (a :class:`DeviceLink`), which makes
them on the attempt's device only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from mayfly.errors import DeviceError, DeviceUnavailableError

__all__ = ["DeviceHandle", "DeviceInfo", "DeviceLink", "TaskContext"]

_MIN_POLL_S = 0.02
_MAX_POLL_S = 1.0


class DeviceInfo(Protocol):
    """What package code may know of its device (an inventory ``Device`` is one).

    Not the inventory model itself: a task process does without pydantic
    (a smaller process to fork, :mod:`mayfly.coordinator.zygote`).
    """

    @property
    def id(self) -> str: ...

    @property
    def labels(self) -> dict[str, str]: ...

    @property
    def capabilities(self) -> tuple[str, ...]: ...


class DeviceLink(Protocol):
    """How a handle reaches its one device (in a task process: the coordinator)."""

    def state(self) -> dict[str, Any]: ...

    def action(self, name: str, payload: dict[str, Any]) -> dict[str, Any]: ...


class DeviceHandle:
    """One device as package code sees it, bounded by the attempt's deadline
    (and, in :meth:`wait_until`, by a cancel of the request)."""

    def __init__(
        self,
        device: DeviceInfo,
        link: DeviceLink,
        deadline: float,
        canceled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._device = device
        self._link = link
        self._deadline = deadline
        self._canceled = canceled

    @property
    def id(self) -> str:
        return self._device.id

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._device.labels)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self._device.capabilities

    def state(self) -> dict[str, Any]:
        """The device's current state."""
        return self._link.state()

    def action(self, name: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Perform ``name`` on the device, once.

        The n-th call of an action name within an attempt always carries the
        same ``Idempotency-Key``, in this attempt, a retry or a redelivery, so
        the device applies it once and replays its answer afterwards.
        """
        return self._link.action(name, payload or {})

    def wait_until(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        interval_s: float = 0.1,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the state until ``predicate(state)`` holds; return that state.

        An unavailable device (rebooting, say) counts as "not yet". Polling
        backs off gently so a thousand waiting devices do not flood the network.

        Raises:
            DeviceError: when the condition does not hold within ``timeout_s``
                (or the attempt's deadline, whichever comes first), or once the
                request is canceled (the device then ends ``canceled``).
        """
        end = min(time.monotonic() + timeout_s, self._deadline)
        delay = max(_MIN_POLL_S, interval_s)
        last_error = "no state read yet"
        while True:
            try:
                state = self.state()
            except DeviceUnavailableError as exc:
                last_error = exc.reason
            else:
                if on_state is not None:
                    on_state(state)
                if predicate(state):
                    return state
                last_error = "condition not met"
            if self._canceled():
                raise DeviceError(self.id, "wait_until stopped: the request was canceled")
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise DeviceError(
                    self.id, f"wait_until gave up after {timeout_s:g} s ({last_error})"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, _MAX_POLL_S)


class TaskContext:
    """The ``ctx`` argument of a package's entrypoint."""

    def __init__(
        self,
        *,
        device: DeviceHandle,
        params: dict[str, Any],
        request_id: str,
        attempt: int,
        deadline: float,
        report_progress: Callable[[float, str], None],
        cancel_flag: Callable[[], bool],
        logger: logging.Logger,
    ) -> None:
        self.device = device
        self.params = params
        self.request_id = request_id
        self.attempt = attempt
        self._deadline = deadline
        self._report = report_progress
        self._cancel_flag = cancel_flag
        self.log = logging.LoggerAdapter(
            logger, {"request_id": request_id, "device_id": device.id, "attempt": attempt}
        )

    def progress(self, percent: float, message: str = "") -> None:
        """Report progress (0-100) for this device."""
        self._report(max(0.0, min(100.0, float(percent))), str(message)[:200])

    def cancelled(self) -> bool:
        """True once the request is canceled or this attempt's time is up."""
        return self._cancel_flag() or time.monotonic() >= self._deadline

    def remaining_s(self) -> float:
        """Seconds left in this attempt."""
        return max(0.0, self._deadline - time.monotonic())
