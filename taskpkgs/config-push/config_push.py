"""Push configuration to a device and read it back."""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> dict[str, Any]:
    wanted = ctx.params["config"]
    mode = ctx.params.get("mode", "merge")
    before = ctx.device.state()["config"]
    ctx.device.action("config-push", {"config": wanted, "mode": mode})
    after = ctx.device.state()["config"]
    wrong = sorted(k for k, v in wanted.items() if after.get(k) != v)
    if wrong:
        raise RuntimeError(f"device did not apply: {', '.join(wrong)}")
    changed = sorted(k for k in wanted if before.get(k) != wanted[k])
    ctx.progress(100, f"{len(changed)} value(s) changed")
    return {"changed": changed, "mode": mode}
