"""Firmware update in four steps: download, install, reboot, confirm.

Each step is an idempotent device action, so a retried attempt resumes
rather than starting over on a device that already did part of the work.
"""

from __future__ import annotations

from typing import Any

STEPS = ("download", "install", "reboot", "confirm")


def _step(ctx: Any, index: int, message: str) -> None:
    ctx.progress(round(100 * index / len(STEPS)), message)
    if ctx.cancelled():
        raise RuntimeError(f"canceled before {STEPS[index]}")


def run(ctx: Any) -> dict[str, Any]:
    target = ctx.params["version"]
    before = ctx.device.state()
    current = before["firmware"]["version"]
    if current == target and not ctx.params.get("force", False):
        ctx.progress(100, f"already on {target}")
        return {"from": current, "to": target, "changed": False}

    _step(ctx, 0, f"downloading {target}")
    ctx.device.action("firmware-download", {"version": target})
    boots = [before["boot_count"]]

    def downloading(state: dict[str, Any]) -> None:
        # A partial download does not survive a reboot (another request's, a
        # power cut): ask again, or this would wait out its timeout for nothing.
        if state["boot_count"] != boots[-1] and state["firmware"]["staged"] != target:
            boots.append(state["boot_count"])
            ctx.log.info("device rebooted during the download; downloading %s again", target)
            ctx.device.action("firmware-download", {"version": target})
        ctx.progress(round(25 * state["firmware"].get("download_progress", 0) / 100), "downloading")

    ctx.device.wait_until(
        lambda s: s["firmware"]["staged"] == target, timeout_s=60.0, on_state=downloading
    )

    _step(ctx, 1, "installing")
    ctx.device.action("firmware-install", {"version": target})

    _step(ctx, 2, "rebooting")
    # The reboot answer (replayed as-is on a retried attempt) holds the boot
    # count from before the reboot: wait for exactly that reboot to finish.
    boot_count = ctx.device.action("reboot")["boot_count"]

    _step(ctx, 3, "confirming")
    after = ctx.device.wait_until(
        lambda s: s["boot_count"] > boot_count and s["firmware"]["version"] == target,
        timeout_s=60.0,
    )
    ctx.progress(100, f"running {target}")
    ctx.log.info("firmware %s -> %s", current, target)
    return {"from": current, "to": after["firmware"]["version"], "changed": True}
