"""The floor: what one request's unavoidable parts cost on this machine, measured bare.

A request through Mayfly is, at the least: a fresh process for its package
code (a fork and an exit), one device action (a loopback POST to the
simulator, the device's own work included) and one durable append of its
result (a SQLite commit, or a Kafka produce acknowledged by all replicas).
Each is measured here without Mayfly around it, as CPU milliseconds per
operation (``getrusage`` of this process and its children, ``/proc`` of the
simulator) and wall milliseconds:

- fork and exit of an interpreter holding the warm parent's imports (what a
  coordinator is forked from) and of one holding the task zygote's;
- one POST of the benchmark's action, on a kept-alive connection (urllib3),
  to ``mayfly devices simulate`` in its own process;
- one ``append`` to a SQLite event log (WAL, as ``mayfly up`` opens it);
- one ``append`` to the Kafka event log, acks=all (skipped without a broker).

    python bench/floor.py [--runs 300] [--json out.json]

``run.py`` adds up the floor per request (task-process fork and exit, POST,
append) and sets Mayfly's CPU per request beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, simulator, write_json

CLK_TCK = os.sysconf("SC_CLK_TCK")

_FORK = """
import gc, os, resource, sys, time, json
import {module}
gc.freeze()
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")][0]
runs = {runs}
def usage():
    return resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
self0, kids0 = usage()
began = time.perf_counter()
for _ in range(runs):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
wall = time.perf_counter() - began
self1, kids1 = usage()
cpu = lambda a, b: b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime
print(json.dumps({{
    "cpu_ms": (cpu(self0, self1) + cpu(kids0, kids1)) / runs * 1000,
    "wall_ms": wall / runs * 1000,
    "rss_mb": rss / 1024,
}}))
"""


def fork_exit(module: str, runs: int) -> dict[str, Any]:
    """Fork and exit of a fresh interpreter that imported ``module``."""
    out = subprocess.run(
        [PYTHON, "-c", _FORK.format(module=module, runs=runs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return {k: round(v, 3) for k, v in result.items()}


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loopback_post(runs: int) -> dict[str, Any]:
    """One POST of the benchmark's action to the simulator, connection kept alive."""
    import urllib3

    with (
        tempfile.TemporaryDirectory(prefix="mayfly-bench-floor-") as tmp,
        simulator(Path(tmp), 1) as fleet,
    ):
        pool = urllib3.PoolManager(maxsize=1)
        url = f"{fleet.url}/devices/sim-0001/actions/config-push"
        body = json.dumps({"config": {"log_level": "info"}, "mode": "merge"}).encode()

        def post(i: int) -> None:
            headers = {"Content-Type": "application/json", "Idempotency-Key": f"floor-{i}"}
            response = pool.request("POST", url, body=body, headers=headers, retries=False)
            if response.status >= 300:
                raise RuntimeError(f"the simulator answered {response.status}")

        for i in range(20):  # the connection, and the simulator's first answers
            post(-i - 1)
        ticks, cpu = _ticks(fleet.child.pid), _cpu_s()
        began = time.perf_counter()
        for i in range(runs):
            post(i)
        wall = time.perf_counter() - began
        client = _cpu_s() - cpu
        server = (_ticks(fleet.child.pid) - ticks) / CLK_TCK
    return {
        "cpu_ms": round((client + server) / runs * 1000, 3),
        "client_cpu_ms": round(client / runs * 1000, 3),
        "simulator_cpu_ms": round(server / runs * 1000, 3),
        "wall_ms": round(wall / runs * 1000, 3),
    }


def _record() -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    from mayfly.events import new_request, to_kafka_record

    key, value, headers = to_kafka_record(new_request("bench-push", devices=["sim-0001"]))
    return key, value, list(headers)


def log_append(log: Any, topic: str, runs: int) -> dict[str, Any]:
    """One durable append of a request-sized record, one at a time."""
    key, value, headers = _record()
    for _ in range(5):
        log.append(topic, key, value, headers)
    cpu = _cpu_s()
    began = time.perf_counter()
    for _ in range(runs):
        log.append(topic, key, value, headers)
    wall = time.perf_counter() - began
    return {
        "cpu_ms": round((_cpu_s() - cpu) / runs * 1000, 3),
        "wall_ms": round(wall / runs * 1000, 3),
        "bytes": len(value),
    }


def sqlite_append(runs: int) -> dict[str, Any]:
    from mayfly.eventlog.sqlite import SqliteEventLog

    with tempfile.TemporaryDirectory(prefix="mayfly-bench-floor-") as tmp:
        log = SqliteEventLog(Path(tmp) / "events.db")
        try:
            return log_append(log, "floor", runs)
        finally:
            log.close()


def kafka_append(runs: int) -> dict[str, Any]:
    bootstrap = os.environ.get("MAYFLY_TEST_KAFKA_BOOTSTRAP")
    if not bootstrap:
        return {"error": "no Kafka broker: run `make up` first"}
    from mayfly.eventlog.kafka import KafkaEventLog

    log = KafkaEventLog(bootstrap)
    try:
        return log_append(log, f"bench-floor-{os.getpid()}", runs) | {"acks": "all"}
    finally:
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = args.runs
    results: dict[str, Any] = {
        "fork_exit_warm_parent": fork_exit("mayfly.app.warm", runs),
        "fork_exit_task_zygote": fork_exit("mayfly.coordinator.zygote", runs),
        "loopback_post": loopback_post(runs),
        "sqlite_append": sqlite_append(runs),
        "kafka_append": kafka_append(runs),
    }
    for log in ("sqlite", "kafka"):
        parts = [
            results["fork_exit_task_zygote"].get("cpu_ms"),
            results["loopback_post"].get("cpu_ms"),
            results[f"{log}_append"].get("cpu_ms"),
        ]
        if all(isinstance(p, float | int) for p in parts):
            results[f"per_request_{log}_cpu_ms"] = round(sum(parts), 3)  # type: ignore[arg-type]
    for name, figures in results.items():
        print(f"{name:28s} {figures}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
