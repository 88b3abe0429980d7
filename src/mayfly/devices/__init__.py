"""Devices: the inventory, the driver port and its HTTP implementation."""

from __future__ import annotations

from mayfly.devices.driver import DeviceDriver, idempotency_key
from mayfly.devices.inventory import Device, Inventory, parse_inventory

__all__ = ["Device", "DeviceDriver", "Inventory", "idempotency_key", "parse_inventory"]
