"""Device inventory: which devices exist, how to reach them, what they can do.

An inventory is JSON, from a file or a bucket object::

    {"devices": [
      {"id": "sim-0001", "driver": "http", "address": "http://127.0.0.1:9100/devices/sim-0001",
       "labels": {"site": "lab-a"}, "capabilities": ["reboot", "firmware"]}
    ]}

Targets resolve from explicit ids and/or a label selector (every label must
match). Naming an unknown id is an error listing every unknown id, not a
silent skip: an operator who typed a wrong id must hear about it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mayfly.errors import InventoryError, UnknownDeviceError

__all__ = ["Device", "Inventory", "parse_inventory"]


class Device(BaseModel):
    """One device: how to reach it and what it advertises."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    driver: str = "http"
    address: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: tuple[str, ...] = ()

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())


class Inventory:
    """An immutable set of devices, indexed by id."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self._by_id: dict[str, Device] = {}
        for device in devices:
            if device.id in self._by_id:
                raise InventoryError(f"device id {device.id!r} appears twice in the inventory")
            self._by_id[device.id] = device

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Any:
        return iter(self._by_id.values())

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def resolve(
        self, ids: Iterable[str] = (), selector: Mapping[str, str] | None = None
    ) -> list[Device]:
        """The target devices, in the order given (ids first, then selector matches).

        Raises:
            UnknownDeviceError: listing every id not in the inventory.
        """
        chosen: dict[str, Device] = {}
        unknown: list[str] = []
        for device_id in ids:
            device = self._by_id.get(device_id)
            if device is None:
                unknown.append(device_id)
            else:
                chosen.setdefault(device_id, device)
        if unknown:
            raise UnknownDeviceError(unknown)
        if selector:
            for device in self._by_id.values():
                if device.matches(selector):
                    chosen.setdefault(device.id, device)
        return list(chosen.values())

    def to_json(self) -> bytes:
        doc = {"devices": [d.model_dump(mode="json") for d in self._by_id.values()]}
        return json.dumps(doc, indent=1).encode() + b"\n"


def parse_inventory(raw: bytes | str, *, origin: str = "inventory") -> Inventory:
    """Parse inventory JSON.

    Raises:
        InventoryError: naming ``origin`` and the entry at fault.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{origin} is not valid JSON: {exc}") from exc
    entries = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InventoryError(f'{origin} must be an object with a "devices" list')
    devices = []
    for index, entry in enumerate(entries):
        try:
            devices.append(Device.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InventoryError(f"{origin}: devices[{index}].{where}: {first['msg']}") from exc
    return Inventory(devices)
