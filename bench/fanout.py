"""Fan-out: one request over 10,000 simulated devices, device actions per second.

Mayfly's local runtime (``mayfly up``, SQLite event log) runs one request
whose targets are every device of a 10,000-device simulator (its own
process); each device gets one ``config-push``. The figure is succeeded
devices / (result durable - request published), and the coordinator's own
run phase (first device started to last finished) beside it.

The ceiling is ``wrk`` (Debian package, C) posting the same action, with
fresh idempotency keys, to the same simulator for a few seconds: the most
device actions per second this simulator serves on this machine.

    python bench/fanout.py [--devices 10000] [--max-processes N] [--json out.json]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    Child,
    mayfly_env,
    publish_packages,
    simulator,
    write_json,
)

from mayfly.app.wiring import open_event_log
from mayfly.devices import parse_inventory
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, from_kafka, merge_completed, new_request
from mayfly.settings import Settings

_WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  local id = string.format("sim-%0{width}d", (counter % {count}) + 1)
  local headers = {{}}
  headers["Content-Type"] = "application/json"
  headers["Idempotency-Key"] = "wrk-{run}-" .. counter
  return wrk.format("POST", "/devices/" .. id .. "/actions/config-push", headers,
                    '{{"config":{{"log_level":"info"}},"mode":"merge"}}')
end
"""


def wrk_ceiling(root: Path, url: str, count: int, seconds: int, connections: int) -> dict[str, Any]:
    binary = shutil.which("wrk")
    if binary is None:
        return {"error": "wrk is missing: `make bench` installs it (Debian package)"}
    script = root / "push.lua"
    width = max(4, len(str(count)))
    script.write_text(_WRK_SCRIPT.format(width=width, count=count, run=uuid.uuid4().hex[:8]))
    out = subprocess.run(
        [binary, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rate_per_s": float(m.group(1)) if m else float("nan"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "connections": connections,
        "seconds": seconds,
    }


def mayfly_fanout(root: Path, inventory: Path, max_processes: int | None) -> dict[str, Any]:
    extra = {}
    if max_processes:
        extra["MAYFLY_MAX_PROCESSES"] = str(max_processes)
    env = mayfly_env(root, inventory, **extra)
    publish_packages(env)
    settings = Settings.from_env(env)
    devices = [d.id for d in parse_inventory(inventory.read_bytes())]
    up = Child("mayfly up", [PYTHON, "-m", "mayfly", "up"], root / "up.log", env)
    log = open_event_log(settings)
    results = log.consumer(f"bench-{uuid.uuid4().hex[:8]}", settings.topics.results)
    try:
        up.wait_for(r"mayfly up: event log", 90)
        request = new_request("bench-push", devices=devices)
        published = time.monotonic()
        publish_request(log, request, None, settings.topics)
        parts: list[TaskCompleted] = []
        deadline = published + 300
        while time.monotonic() < deadline:
            for record in results.poll(100, 0.05):
                event = from_kafka(record.headers, record.key, record.value)
                if isinstance(event, TaskCompleted) and event.request_id == request.id:
                    parts.append(event)
            if parts and len(parts) >= parts[0].part.count:
                break
        done = time.monotonic()
        if not parts or len(parts) < parts[0].part.count:
            return {"error": "no complete result within 300 s", "parts": len(parts)}
        result = merge_completed(parts)
        ok = sum(1 for d in result.devices if d.status == "succeeded")
        starts = [d.started_at for d in result.devices if d.started_at]
        ends = [d.finished_at for d in result.devices if d.finished_at]
        run_s = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
        return {
            "devices": len(devices),
            "succeeded": ok,
            "seconds": round(done - published, 2),
            "rate_per_s": round(ok / (done - published), 1),
            "run_phase_seconds": round(run_s, 2),
            "run_phase_rate_per_s": round(ok / run_s, 1) if run_s else None,
            "cold_start_ms": result.timings.cold_start_ms,
            "result_parts": len(parts),
            "max_processes": settings.max_processes,
        }
    finally:
        results.close()
        log.close()
        up.stop()


def run(root: Path, count: int, max_processes: list[int], wrk_seconds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": count}
    with simulator(root, count) as fleet:
        out["wrk"] = wrk_ceiling(root, fleet.url, count, wrk_seconds, 64)
        runs = []
        for n in max_processes or [0]:
            home = root / f"fanout-{n}"
            home.mkdir()
            runs.append(mayfly_fanout(home, fleet.inventory, n or None))
        out["mayfly"] = max(runs, key=lambda r: r.get("rate_per_s", 0.0))
        if len(runs) > 1:
            out["by_max_processes"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument(
        "--max-processes",
        type=int,
        action="append",
        help="MAYFLY_MAX_PROCESSES to try (repeatable); default: the settings' default",
    )
    parser.add_argument("--wrk-seconds", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mayfly-bench-fanout-") as tmp:
        out = run(Path(tmp), args.devices, args.max_processes or [], args.wrk_seconds)
    m, w = out["mayfly"], out["wrk"]
    print(
        f"fan-out over {args.devices} devices: mayfly {m.get('rate_per_s')} actions/s "
        f"(run phase {m.get('run_phase_rate_per_s')}/s, {m.get('max_processes')} task processes), "
        f"wrk ceiling {w.get('rate_per_s')}/s"
    )
    for r in out.get("by_max_processes", []):
        print(f"  max_processes {r.get('max_processes')}: {r.get('rate_per_s')} actions/s")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
