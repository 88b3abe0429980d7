"""What a package says (``ctx.log``, ``ctx.progress``) reaches the operator:
in ``mayfly up``'s output, ``watch``, ``get``, the result and the trace.

A real ``mayfly up`` on SQLite and on Kafka runs a package that logs and
reports progress, and runs long enough for its coordinator to report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mayfly.testing import publish_folders
from tests.coordinator.conftest import write_package
from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]

CODE = """
import time


def run(ctx):
    ctx.log.info("starting on %s", ctx.device.id)
    ctx.progress(30, "halfway there")
    ctx.device.state()
    time.sleep(1.5)
    ctx.log.warning("odd \\x1b[31mvalue\\nsecond line")
    ctx.progress(100, "done")
    return {"ok": True}
"""
MANIFEST = {
    "name": "chatty",
    "version": "1.0.0",
    "description": "Logs and reports progress.",
    "entrypoint": "task:run",
    "params_schema": {"type": "object", "additionalProperties": False},
    "limits": {"timeout_s": 60, "device_timeout_s": 30, "memory_mb": 128, "max_parallel": 10},
    "capabilities": [],
    "dependencies": [],
}
ODD = "odd \\x1b[31mvalue\\nsecond line"  # as a terminal line shows it: escaped


def _events(trace_file: Path, device: str) -> list[dict[str, Any]]:
    """The events of the device's span in the trace file, once it is there."""
    if not trace_file.exists():
        return []
    for line in trace_file.read_text().splitlines():
        for resource in json.loads(line).get("resourceSpans", []):
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    if span["name"] == f"device {device}":
                        return list(span.get("events", []))
    return []


def test_package_lines_reach_up_watch_get_the_result_and_the_trace(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    publish_folders(home.settings(), [write_package(tmp_path / "chatty", MANIFEST, CODE)])
    fleet(2)
    up_log = home.root.parent / "up.log"
    home.up_with("-v", output=up_log, **log_env)
    run = _mayfly(home, log_env, "publish", "chatty", "-d", "sim-0001", "-d", "sim-0002")
    request_id = _published_id(run)

    watch = _mayfly(home, log_env, "watch", request_id, "--timeout", "120")
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert "sim-0001 #1 info: starting on sim-0001" in watch.stdout
    assert "sim-0002 #1 progress: 30% halfway there" in watch.stdout

    got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
    lines = {d["device_id"]: d["logs"] for d in got["outcome"]["devices"]}
    assert [(ln["level"], ln["message"]) for ln in lines["sim-0001"]] == [
        ("info", "starting on sim-0001"),
        ("progress", "halfway there"),
        ("warning", "odd \x1b[31mvalue\nsecond line"),
        ("progress", "done"),
    ]
    assert lines["sim-0001"][-1]["percent"] == 100.0
    assert {ln["attempt"] for ln in lines["sim-0002"]} == {1}

    table = _mayfly(home, log_env, "get", request_id, "--logs")
    assert table.returncode == 0, table.stderr
    assert f"sim-0002 #1 warning: {ODD}" in table.stdout
    assert "\x1b" not in table.stdout

    trace_file = home.root / "telemetry" / "traces.jsonl"
    deadline = time.monotonic() + 30
    while not (events := _events(trace_file, "sim-0001")) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [e["name"] for e in events] == ["log", "progress", "log", "progress"]
    first = {a["key"]: a["value"] for a in events[0]["attributes"]}
    assert first["mayfly.log.message"] == {"stringValue": "starting on sim-0001"}
    assert first["mayfly.log.level"] == {"stringValue": "info"}

    logged = up_log.read_text()
    assert f"{request_id} sim-0001 #1: starting on sim-0001" in logged
    assert f"{request_id} sim-0002 #1: {ODD}" in logged
    assert "\x1b" not in logged
