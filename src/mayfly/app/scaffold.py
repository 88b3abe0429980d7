"""``mayfly pkg new NAME``: a package folder to start from, as ``kn func
create`` makes a function's: a manifest with every field at a sensible
value, the task's code using the context API, and a test of it on simulated
devices (:func:`mayfly.testing.run_folder`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mayfly.errors import PackageError
from mayfly.packages.manifest import NAME_PATTERN

__all__ = ["new_package"]

_CODE = '''"""{name}: what it does to one device. Called once per device, in a sandboxed
task process: no network of its own (device calls go through ctx.device),
writes only to its scratch folder."""

from __future__ import annotations

from typing import Any


def run(ctx: Any) -> dict[str, Any]:
    state = ctx.device.state()  # GET the device's state
    firmware = (state.get("firmware") or {{}}).get("version")
    ctx.log.info("%s runs firmware %s", ctx.device.id, firmware)
    ctx.progress(50, "state read")
    # An action: ctx.device.action("reboot"), ctx.device.action("config-push", {{...}}).
    # Each carries an Idempotency-Key, so a retried attempt changes the device once.
    ctx.progress(100, "done")
    return {{"message": ctx.params["message"], "firmware": firmware}}
'''

_TEST = '''"""{name} on three simulated devices, through a real coordinator and sandbox."""

from pathlib import Path

from mayfly.testing import run_folder


def test_it_succeeds_on_three_simulated_devices() -> None:
    outcome = run_folder(Path(__file__).parent, devices=3, params={{"message": "hi"}})
    assert outcome.status.value == "succeeded", outcome
    assert [d.output["message"] for d in outcome.devices] == ["hi"] * 3
'''


def new_package(parent: Path, name: str) -> Path:
    """Write a new package folder ``parent/name``; its path.

    Raises:
        PackageError: ``name`` is no package name, or the folder exists.
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise PackageError(
            f"{name!r} is not a package name: lowercase letters, digits and '-', "
            "starting with a letter or digit, at most 63"
        )
    folder = parent / name
    if folder.exists():
        raise PackageError(f"{folder} exists already; choose another name or folder")
    module = name.replace("-", "_")
    if module[0].isdigit():
        module = f"task_{module}"
    manifest = {
        "name": name,
        "version": "0.1.0",
        "description": f"What {name} does to a device.",
        "entrypoint": f"{module}:run",
        "params_schema": {
            "type": "object",
            "properties": {"message": {"type": "string", "maxLength": 200, "default": "hello"}},
            "additionalProperties": False,
        },
        "limits": {
            "timeout_s": 120,
            "device_timeout_s": 15,
            "memory_mb": 128,
            "max_parallel": 20,
            "retries": 1,
        },
        "capabilities": [],
        "dependencies": [],
    }
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / f"{module}.py").write_text(_CODE.format(name=name))
    (folder / f"test_{module}.py").write_text(_TEST.format(name=name))
    return folder
