"""The device driver port, its optional non-blocking engine, and the
idempotency keys every action carries."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from mayfly.devices.inventory import Device
from mayfly.errors import DeviceActionError, DeviceUnavailableError

__all__ = ["CallDone", "CallLoop", "CallOutcome", "DeviceDriver", "LoopedDriver", "idempotency_key"]

#: A call's end: the device's JSON object, or the error the driver would raise.
CallOutcome = dict[str, Any] | DeviceActionError | DeviceUnavailableError
#: Told each call's outcome, with the caller's token, from :meth:`CallLoop.pump`.
CallDone = Callable[[object, CallOutcome], None]


def idempotency_key(
    request_id: str, device_id: str, action: str, ordinal: int, *, source: str = ""
) -> str:
    """The ``Idempotency-Key`` of the ``ordinal``-th ``action`` call for one device.

    Derived, not random: a retried attempt or a redelivered request makes the
    same calls in the same order and so sends the same keys, and the device
    applies each action once. The request is known by its ``source`` and id
    (two publishers may use one id), so another publisher's request never
    replays this one's answers. Hashed so it is a safe header value whatever
    the ids contain.
    """
    raw = f"{request_id}\x1f{device_id}\x1f{action}\x1f{ordinal}".encode()
    if source:
        raw += f"\x1f{source}".encode()
    return hashlib.sha256(raw).hexdigest()[:40]


class DeviceDriver(Protocol):
    """Speaks to devices of one kind. Implementations must be thread-safe."""

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        """The device's current state.

        ``deadline`` (a ``time.monotonic()`` value) bounds the call, retries
        and waits included.

        Raises:
            DeviceUnavailableError: unreachable or not answering after retries.
            DeviceActionError: an answer that breaks the protocol.
        """
        ...

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Ask the device to perform ``name``; its JSON answer.

        Raises:
            DeviceUnavailableError: unreachable or not answering after retries.
            DeviceActionError: the device refused the action.
        """
        ...

    def close(self) -> None:
        """Release pooled connections."""
        ...


class CallLoop(Protocol):
    """A driver's device calls made without a thread each, for a caller that
    runs its own loop (the coordinator): it waits for :attr:`fd` or until
    :meth:`next_wake`, then :meth:`pump`. Single-threaded."""

    @property
    def fd(self) -> int:
        """Readable when there is news: :meth:`pump` then."""
        ...

    def serves(self, device: Device) -> bool:
        """Whether this loop can make ``device``'s calls (else: the driver's own methods)."""
        ...

    def next_wake(self) -> float:
        """When to :meth:`pump` even if :attr:`fd` stays quiet (``time.monotonic()``)."""
        ...

    def start(
        self,
        token: object,
        device: Device,
        op: str,
        name: str | None,
        payload: dict[str, Any] | None,
        idempotency_key: str | None,
        deadline: float | None,
        done: CallDone,
    ) -> None:
        """Begin ``op`` (``state`` or ``action``), as :class:`DeviceDriver`'s methods
        would; ``done(token, outcome)`` is called from a later :meth:`pump`."""
        ...

    def pump(self) -> None:
        """Move every call along and tell those that ended."""
        ...

    def cancel(self, done: CallDone, token: object = None) -> None:
        """Drop every call told to ``done`` (or only the one of ``token``), untold:
        nothing more of it is sent."""
        ...


@runtime_checkable
class LoopedDriver(Protocol):
    """A :class:`DeviceDriver` that can also make its calls on a :class:`CallLoop`."""

    def call_loop(self) -> CallLoop | None:
        """Its loop, or None when it has none to offer (e.g. another transport)."""
        ...
