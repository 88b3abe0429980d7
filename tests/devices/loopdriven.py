"""An HttpDriver driven through its non-blocking engine, one call at a time."""

from __future__ import annotations

import select
import time
from typing import Any

from mayfly.devices import Device
from mayfly.devices.driver import CallOutcome as Outcome
from mayfly.devices.http import HttpDriver


class LoopDriven:
    """An :class:`HttpDriver` whose calls go through its non-blocking engine,
    each one waited for the way the coordinator's loop waits for it."""

    def __init__(self, driver: HttpDriver) -> None:
        self.driver = driver
        loop = driver.call_loop()
        assert loop is not None
        self.loop = loop

    def _run(
        self,
        device: Device,
        op: str,
        name: str | None,
        payload: dict[str, Any] | None,
        key: str | None,
        deadline: float | None,
    ) -> dict[str, Any]:
        assert self.loop.serves(device)
        outcomes: list[Outcome] = []
        tell = outcomes.append
        self.loop.start(None, device, op, name, payload, key, deadline, lambda _, o: tell(o))
        while not outcomes:
            wait = min(self.loop.next_wake() - time.monotonic(), 1.0)
            select.select([self.loop.fd], [], [], max(0.0, wait))
            self.loop.pump()
        if isinstance(outcomes[0], Exception):
            raise outcomes[0]
        return outcomes[0]

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        return self._run(device, "state", None, None, None, deadline)

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        return self._run(device, "action", name, payload, idempotency_key, deadline)

    def close(self) -> None:
        self.driver.close()
