"""Reboot a device, then wait until it is back with a fresh boot."""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> dict[str, Any]:
    # The answer carries the boot count from before the reboot. A retried
    # attempt gets the same answer replayed (same Idempotency-Key), so it
    # waits for that one reboot instead of asking for a second.
    before = ctx.device.action("reboot")["boot_count"]
    ctx.progress(50, "rebooting")
    if not ctx.params.get("wait_online", True):
        return {"boot_count_before": before, "waited": False}
    after = ctx.device.wait_until(
        lambda s: s["boot_count"] > before,
        timeout_s=float(ctx.params.get("max_wait_s", 30)),
    )
    ctx.progress(100, "back online")
    return {"boot_count_before": before, "boot_count": after["boot_count"]}
