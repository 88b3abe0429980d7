from __future__ import annotations

import json

import pytest

from mayfly.devices import Device, Inventory, parse_inventory
from mayfly.errors import InventoryError, UnknownDeviceError


def _inventory() -> Inventory:
    return Inventory(
        Device(
            id=f"d{i}",
            address=f"http://127.0.0.1:1/devices/d{i}",
            labels={"site": "a" if i % 2 else "b", "model": "m1"},
        )
        for i in range(6)
    )


def test_resolve_ids_then_selector_without_duplicates() -> None:
    chosen = _inventory().resolve(["d4", "d1"], {"site": "a"})
    assert [d.id for d in chosen] == ["d4", "d1", "d3", "d5"]


def test_selector_needs_every_label() -> None:
    assert [d.id for d in _inventory().resolve((), {"site": "b", "model": "m1"})] == [
        "d0",
        "d2",
        "d4",
    ]
    assert _inventory().resolve((), {"site": "b", "model": "m2"}) == []


def test_unknown_ids_are_all_named() -> None:
    with pytest.raises(UnknownDeviceError) as err:
        _inventory().resolve(["d1", "nope", "gone"])
    assert err.value.device_ids == ("nope", "gone")
    assert "unknown device(s) (2): nope, gone" in str(err.value)


def test_round_trip_and_errors() -> None:
    inv = _inventory()
    again = parse_inventory(inv.to_json())
    assert [d.id for d in again] == [d.id for d in inv]
    with pytest.raises(InventoryError, match="not valid JSON"):
        parse_inventory("{")
    with pytest.raises(InventoryError, match='"devices" list'):
        parse_inventory("[]")
    with pytest.raises(InventoryError, match=r"devices\[1\]\.address"):
        parse_inventory(json.dumps({"devices": [{"id": "a", "address": "x"}, {"id": "b"}]}))
    with pytest.raises(InventoryError, match="appears twice"):
        parse_inventory(json.dumps({"devices": [{"id": "a", "address": "x"}] * 2}))
