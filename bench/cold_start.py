"""Cold start: request dequeued to package code running, warm fork vs fresh interpreter.

Mayfly's local runtime forks each coordinator from a warm parent that already
did the imports and the wiring. The baseline starts a fresh interpreter per
request (``python -m mayfly.coordinator``), as a container per request would.
Both run the same request (a no-op package on one simulated device), and
both report the same figure: ``timings.cold_start_ms`` of the result, from
the moment the coordinator was asked to start to the moment the first device's
task code was handed to a task process.

    python bench/cold_start.py [--runs 50] [--json out.json]

Prints p50 and p99 for each and their ratio. Bounded: at most --runs requests
each, one at a time, on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from mayfly.app.warm import WarmCoordinator
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.eventlog import LogRecord
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import TaskCompleted, from_kafka, new_request, to_kafka_record
from mayfly.runtime.session import answer_blocking
from mayfly.runtime.spawner import Spawner
from mayfly.settings import Settings
from mayfly.testing import publish_folder
from mayfly.topics import Topics

NOOP = {
    "name": "noop",
    "version": "1.0.0",
    "entrypoint": "noop:run",
    "limits": {"retries": 0, "device_timeout_s": 10},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _setup(root: Path, inventory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAYFLY_", "TASK_"))}
    env |= {
        "MAYFLY_HOME": str(root / "home"),
        "MAYFLY_INVENTORY": str(inventory),
        "MAYFLY_RESULT_SINK": str(root / "job-results.jsonl"),
    }
    folder = root / "noop"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(NOOP))
    (folder / "noop.py").write_text("def run(ctx):\n    return 'ok'\n")
    publish_folder(Settings.from_env(env), folder)
    return env


def warm_fork(env: dict[str, str], runs: int) -> list[float]:
    settings = Settings.from_env(env)
    log = SqliteEventLog(Path(settings.event_log))
    spawner = Spawner(lambda: WarmCoordinator(settings))
    spawner.start()
    consumer = log.consumer("bench", Topics().results)
    found: list[float] = []
    try:
        for i in range(runs):
            key, value, headers = to_kafka_record(new_request("noop", devices=["sim-0001"]))
            record = LogRecord("bench", 0, i, key, value, tuple(headers))
            session = spawner.spawn(str(i), record, datetime.now(UTC))
            answer_blocking(session, log)  # as the runtime's appender, strict mode
            session.close()
            exits = []
            while not exits:
                exits = spawner.exits(5.0)
            for r in consumer.poll(10, 5.0):
                event = from_kafka(r.headers, r.key, r.value)
                assert isinstance(event, TaskCompleted), event
                assert event.status == "succeeded", event
                found.append(float(event.timings.cold_start_ms or 0.0))
    finally:
        spawner.stop()
        consumer.close()
        log.close()
    return found


def fresh_interpreter(env: dict[str, str], runs: int) -> list[float]:
    results = Path(env["MAYFLY_RESULT_SINK"])
    for i in range(runs):
        job = subprocess.run(
            [sys.executable, "-m", "mayfly.coordinator"],
            env=env | {"TASK_TYPE": "noop", "DEVICE_IDS": "sim-0001", "TASK_ID": f"fresh-{i}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if job.returncode != 0:
            raise SystemExit(f"baseline run failed: {job.stderr}")
    found = []
    for line in results.read_text().splitlines():
        found.append(float(json.loads(line)["data"]["timings"]["cold_start_ms"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="mayfly-bench-") as tmp,
        SimulatorServer(Simulator(1)) as server,
    ):
        root = Path(tmp)
        inventory = root / "inventory.json"
        inventory.write_bytes(server.inventory().to_json())
        env = _setup(root, inventory)
        started = time.monotonic()
        warm = warm_fork(env, args.runs)
        fresh = fresh_interpreter(env, args.runs)
        elapsed = time.monotonic() - started
    rows = {
        "warm_fork": {
            "p50_ms": percentile(warm, 50),
            "p99_ms": percentile(warm, 99),
            "mean_ms": statistics.fmean(warm),
            "runs": len(warm),
        },
        "fresh_interpreter": {
            "p50_ms": percentile(fresh, 50),
            "p99_ms": percentile(fresh, 99),
            "mean_ms": statistics.fmean(fresh),
            "runs": len(fresh),
        },
    }
    ratio_p50 = rows["fresh_interpreter"]["p50_ms"] / rows["warm_fork"]["p50_ms"]
    ratio_p99 = rows["fresh_interpreter"]["p99_ms"] / rows["warm_fork"]["p99_ms"]
    print(
        f"cold start, request dequeued -> task code running ({args.runs} runs each, "
        f"{elapsed:.0f} s)"
    )
    print(f"{'':<20}{'p50 ms':>10}{'p99 ms':>10}")
    for name, row in rows.items():
        print(f"{name:<20}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}")
    print(f"{'fresh / warm':<20}{ratio_p50:>9.1f}x{ratio_p99:>9.1f}x")
    print("target (warm fork): p50 <= 20 ms, p99 <= 60 ms")
    if args.json:
        args.json.write_text(
            json.dumps(rows | {"ratio_p50": ratio_p50, "ratio_p99": ratio_p99}, indent=2)
        )


if __name__ == "__main__":
    main()
