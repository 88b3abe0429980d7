"""Sharded fan-out: one request over 100,000 simulated devices, in shards or whole.

Mayfly's local runtime (``mayfly up``, SQLite event log, traces to the trace
file) runs one ``bench-push`` request whose selector matches every device of
a simulator (its own process), twice, each time in a fresh home:

- whole: ``MAYFLY_SHARD_SIZE`` over the device count, so one coordinator
  runs all of it (the baseline);
- sharded: the default shard size (or ``--shard-size``), so the request is
  cut into shards and each runs in a coordinator of its own, as many at once
  as the runtime's per-task cap lets.

The figure is succeeded devices / (archived merged result - request
published). Reported beside it: the shards, how many coordinators (distinct
processes) ran them and at most how many at once (from the shards' own
start and finish times), and the traces the request made in the trace file
(one is right: the root, a span per shard, a span per device).

    python bench/shards.py [--devices 100000] [--shard-size N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, Child, mayfly_env, publish_packages, simulator, write_json

from mayfly.aggregator.archive import LocalResultArchive
from mayfly.app.wiring import open_event_log
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, new_request
from mayfly.settings import DEFAULT_SHARD_SIZE, Settings


def _at_once(windows: list[tuple[datetime, datetime]]) -> int:
    """The most windows open at one moment."""
    edges = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def _traces(trace_file: Path, request_id: str) -> int:
    """Trace ids whose spans carry this request's id."""
    found: set[str] = set()
    if not trace_file.exists():
        return 0
    needle = request_id.encode()
    with trace_file.open("rb") as lines:
        for line in lines:
            if needle not in line:
                continue
            for resource in json.loads(line)["resourceSpans"]:
                for scope in resource["scopeSpans"]:
                    for span in scope["spans"]:
                        values = [a["value"].get("stringValue") for a in span["attributes"]]
                        if request_id in values:
                            found.add(span["traceId"])
    return len(found)


def _labelled(inventory: Path) -> Path:
    """The simulator's inventory with one label every device has, for the selector
    (a request naming 100,000 device ids would not fit one Kafka record)."""
    data = json.loads(inventory.read_bytes())
    for device in data["devices"]:
        device.setdefault("labels", {})["bench"] = "all"
    labelled = inventory.with_name("inventory-labelled.json")
    labelled.write_text(json.dumps(data))
    return labelled


def one_run(root: Path, inventory: Path, devices: int, shard_size: int) -> dict[str, Any]:
    env = mayfly_env(root, inventory, MAYFLY_SHARD_SIZE=str(shard_size))
    publish_packages(env)
    settings = Settings.from_env(env)
    up = Child("mayfly up", [PYTHON, "-m", "mayfly", "up"], root / "up.log", env)
    log = open_event_log(settings)
    archive = LocalResultArchive(Path(settings.archive))
    try:
        up.wait_for(r"mayfly up: event log", 90)
        request = new_request("bench-push", selector={"bench": "all"})
        published = time.monotonic()
        publish_request(log, request, None, settings.topics)
        merged: TaskCompleted | None = None
        deadline = published + 400
        while merged is None and time.monotonic() < deadline:
            time.sleep(0.5)
            for event in archive.read():
                if isinstance(event, TaskCompleted) and event.request_id == request.id:
                    merged = event
        done = time.monotonic()
        if merged is None:
            return {"error": "no archived result within 400 s", "shard_size": shard_size}
        up.stop()  # its exporter flushes the trace file on the way out
        ok = sum(1 for d in merged.devices if d.status == "succeeded")
        runs = merged.shards
        windows = [(r.timings.started_at, r.timings.finished_at) for r in runs] or [
            (merged.timings.started_at, merged.timings.finished_at)
        ]
        pids = {r.coordinator.pid for r in runs} or {merged.coordinator.pid}
        return {
            "devices": len(merged.devices),
            "succeeded": ok,
            "shard_size": shard_size,
            "shards": len(runs) or 1,
            "coordinators": len(pids),
            "coordinators_at_once": _at_once(windows),
            "seconds": round(done - published, 2),
            "rate_per_s": round(ok / (done - published), 1),
            "traces": _traces(Path(settings.trace_file or ""), request.id),
        }
    finally:
        log.close()
        up.stop()


def run(root: Path, devices: int, shard_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": devices}
    with simulator(root, devices) as fleet:
        inventory = _labelled(fleet.inventory)
        for name, size in (("whole", devices + 1), ("sharded", shard_size)):
            home = root / name
            home.mkdir()
            out[name] = one_run(home, inventory, devices, size)
    whole, sharded = out["whole"].get("rate_per_s"), out["sharded"].get("rate_per_s")
    out["speedup"] = round(sharded / whole, 2) if whole and sharded else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mayfly-bench-shards-") as tmp:
        out = run(Path(tmp), args.devices, args.shard_size)
    w, s = out["whole"], out["sharded"]
    print(
        f"one request over {args.devices} devices: whole {w.get('rate_per_s')} actions/s "
        f"(1 coordinator, {w.get('seconds')} s); sharded {s.get('rate_per_s')} actions/s "
        f"({s.get('shards')} shards on {s.get('coordinators')} coordinators, "
        f"{s.get('coordinators_at_once')} at once, {s.get('seconds')} s, "
        f"{s.get('traces')} trace); speed-up {out['speedup']}x"
    )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
