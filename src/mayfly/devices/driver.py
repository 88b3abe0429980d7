"""The device driver port and the idempotency keys every action carries."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from mayfly.devices.inventory import Device

__all__ = ["DeviceDriver", "idempotency_key"]


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
