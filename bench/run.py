"""Every benchmark in one run: one table (Mayfly, baseline, ratio) and one JSON file.

Runs each benchmark as its own process, one after the other (they would
otherwise share the two cores), each with a time limit, then prints the
table and writes the figures with the machine's description to
``bench/results/latest.json`` (or ``--json``). `make bench` runs this after
`make up`; without Kafka or Jaeger those rows say so.

    python bench/run.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, machine

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
PIPELINE_LIMIT_S = 420


def _bench(name: str, args: list[str], limit_s: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{name}.json"
    started = time.monotonic()
    print(f"== {name} (at most {limit_s} s)", flush=True)
    try:
        proc = subprocess.run(
            [PYTHON, str(HERE / f"{name}.py"), *args, "--json", str(out)],
            timeout=limit_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over its {limit_s} s limit", "elapsed_s": limit_s}
    elapsed = round(time.monotonic() - started, 1)
    if proc.returncode != 0 or not out.exists():
        return {"error": f"exit code {proc.returncode}", "elapsed_s": elapsed}
    data: dict[str, Any] = json.loads(out.read_text())
    data["elapsed_s"] = elapsed
    return data


def _get(data: dict[str, Any], *path: str) -> float:
    value: Any = data
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return math.nan
        value = value[key]
    return float(value) if isinstance(value, int | float) else math.nan


#: The processes a request's CPU is split over (``pipeline.py``'s per_request).
CPU_PARTS = (
    ("dispatcher_cpu_ms", "mayfly up"),
    ("warm_parent_cpu_ms", "warm parent"),
    ("coordinators_cpu_ms", "coordinators"),
    ("task_zygote_cpu_ms", "task zygote"),
    ("task_processes_cpu_ms", "task processes"),
    ("simulator_cpu_ms", "simulator"),
)


def _per_request(pipe: dict[str, Any], log: str) -> dict[str, Any]:
    found = pipe.get(f"mayfly_{log.lower()}", {}).get("throughput", {}).get("per_request")
    return found if isinstance(found, dict) else {}


def request_cpu_ms(split: dict[str, Any]) -> float:
    """A request's CPU in every process it touched, the device's (simulator's) included."""
    parts = [split.get(key) for key, _ in CPU_PARTS]
    known = [float(p) for p in parts if isinstance(p, int | float)]
    return sum(known) if known else math.nan


def render_split(results: dict[str, Any]) -> str:
    """CPU per request by process and minor faults, burst in the default mode."""
    pipe = results.get("pipeline", {})
    head = "| per request (burst)  | " + " | ".join(f"{name:>14}" for _, name in CPU_PARTS)
    lines = [
        head + " | minor faults |",
        "|" + "-" * 22 + "|" + "|".join("-" * 16 for _ in CPU_PARTS) + "|--------------|",
    ]
    for log in ("Kafka", "SQLite"):
        split = _per_request(pipe, log)
        if not split:
            continue
        cells = [split.get(key) for key, _ in CPU_PARTS]
        faults = sum(
            float(split.get(k, 0)) for k in ("coordinator_minor_faults", "task_minor_faults")
        )
        lines.append(
            f"| {log + ', CPU ms':<20} | "
            + " | ".join(f"{_fmt(c) if c is not None else 'n/a':>14}" for c in cells)
            + f" | {faults:>12,.0f} |"
        )
    return "\n".join(lines)


def _devices_k(shards: dict[str, Any]) -> str:
    count = shards.get("devices")
    return f"{count // 1000}k" if isinstance(count, int) else "n/a"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: what, Mayfly, baseline, ratio (Mayfly / baseline), target, met."""
    cold, pipe = results["cold_start"], results["pipeline"]
    knative = results.get("knative", {})
    fan, agg = results["fanout"], results["aggregator"]
    shards = results.get("shards", {})
    celery_rate = _get(pipe, "celery", "throughput", "rate_per_s")
    table = [
        (
            "cold start p50 (ms)",
            _get(cold, "warm_fork", "p50_ms"),
            _get(cold, "fresh_interpreter", "p50_ms"),
            "fresh interpreter",
            "<= 5",
            lambda m: m <= 5,
        ),
        (
            "cold start p99 (ms)",
            _get(cold, "warm_fork", "p99_ms"),
            _get(cold, "fresh_interpreter", "p99_ms"),
            "fresh interpreter",
            "<= 15",
            lambda m: m <= 15,
        ),
        (
            "Knative scale from zero p50 (ms)",
            _get(knative, "scale_from_zero", "p50_ms"),
            _get(cold, "warm_fork", "p50_ms"),
            "local cold start",
            "report",
            None,
        ),
        *(
            (
                f"throughput, {log}{' strict' if strict else ''} (req/s)",
                _get(
                    pipe,
                    f"mayfly_{log.lower()}{'_strict' if strict else ''}",
                    "throughput",
                    "rate_per_s",
                ),
                celery_rate,
                "Celery + Redis",
                ">= 0.5x baseline" if strict else ">= 1.0x baseline",
                (lambda m: m >= celery_rate / 2) if strict else (lambda m: m >= celery_rate),
            )
            for strict in (False, True)
            for log in ("Kafka", "SQLite")
        ),
        (
            "fan-out 10k devices (actions/s)",
            _get(fan, "mayfly", "rate_per_s"),
            _get(fan, "wrk", "rate_per_s"),
            "wrk ceiling",
            ">= 0.8x baseline",
            lambda m: m >= 0.8 * _get(fan, "wrk", "rate_per_s"),
        ),
        (
            f"sharded fan-out {_devices_k(shards)} devices (actions/s)",
            _get(shards, "sharded", "rate_per_s"),
            _get(shards, "whole", "rate_per_s"),
            "one coordinator",
            "> 1.0x baseline",
            lambda m: m > _get(shards, "whole", "rate_per_s"),
        ),
        (
            "aggregator (events/s)",
            _get(agg, "mayfly", "rate_per_s"),
            _get(agg, "bare_sdk", "rate_per_s"),
            "bare OTel SDK",
            ">= 0.9x baseline",
            lambda m: m >= 0.9 * _get(agg, "bare_sdk", "rate_per_s"),
        ),
        (
            "idle: coordinators alive",
            _get(pipe, "mayfly_kafka", "idle", "coordinators_alive"),
            _get(pipe, "celery", "idle", "processes"),
            "Celery processes",
            "0",
            lambda m: m == 0,
        ),
        (
            "idle: dispatcher RSS (MB)",
            _get(pipe, "mayfly_kafka", "idle", "dispatcher_rss_mb"),
            _get(pipe, "celery", "idle", "rss_mb"),
            "Celery RSS",
            "< 60",
            lambda m: m < 60,
        ),
        (
            "idle: CPU (% of a core)",
            _get(pipe, "mayfly_kafka", "idle", "idle_cpu_pct"),
            _get(pipe, "celery", "idle", "idle_cpu_pct"),
            "Celery processes",
            "< 0.5",
            lambda m: m < 0.5,
        ),
    ]
    celery_p50 = _get(pipe, "celery", "latency", "p50_ms")
    for lane in ("sqlite", "kafka"):
        for q in ("p50", "p99"):
            checked = lane == "kafka" and q == "p50"
            table.append(
                (
                    f"latency {q}, {lane} (ms)",
                    _get(pipe, f"mayfly_{lane}", "latency", f"{q}_ms"),
                    _get(pipe, "celery", "latency", f"{q}_ms"),
                    "Celery + Redis",
                    "<= 3x baseline" if checked else "report",
                    (lambda m: m <= 3 * celery_p50) if checked else None,
                )
            )
    floor = results.get("floor", {})
    for log in ("Kafka", "SQLite"):
        table.append(
            (
                f"CPU per request, {log} (ms)",
                request_cpu_ms(_per_request(pipe, log)),
                _get(floor, f"per_request_{log.lower()}_cpu_ms"),
                "floor",
                "report",
                None,
            )
        )
    out = []
    for what, mayfly, baseline, against, target, check in table:
        ratio = mayfly / baseline if baseline and not math.isnan(baseline) else math.nan
        met = None if check is None or math.isnan(mayfly) else bool(check(mayfly))
        out.append(
            {
                "what": what,
                "mayfly": mayfly,
                "baseline": baseline,
                "baseline_is": against,
                "ratio": round(ratio, 3) if not math.isnan(ratio) else None,
                "target": target,
                "met": met,
            }
        )
    return out


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if 0 < abs(value) < 1:  # idle CPU: 0.45 must not read as 0.5
        return f"{value:.2f}"
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def render(table: list[dict[str, Any]]) -> str:
    lines = [
        f"| {'benchmark':<34} | {'Mayfly':>9} | {'baseline':>9} | {'baseline is':<17} "
        f"| {'ratio':>6} | {'target':<16} | met |",
        f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 19}|{'-' * 8}|{'-' * 18}|-----|",
    ]
    for r in table:
        met = {True: "yes", False: "no", None: ""}[r["met"]]
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
        lines.append(
            f"| {r['what']:<34} | {_fmt(r['mayfly']):>9} | {_fmt(r['baseline']):>9} "
            f"| {r['baseline_is']:<17} | {ratio:>6} | {r['target']:<16} | {met:<3} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    args = parser.parse_args()
    started = time.monotonic()
    q = args.quick
    load_before = machine()["load_avg"]
    with tempfile.TemporaryDirectory(prefix="mayfly-bench-") as tmp:
        t = Path(tmp)
        results = {
            "cold_start": _bench("cold_start", ["--runs", "10" if q else "40"], 300, t),
            # Its own alarm (--limit-s) goes off first, so it still stops
            # the servers it started (up to 15 s each) before this limit.
            "pipeline": _bench(
                "pipeline",
                [
                    "--burst",
                    "100" if q else "400",
                    "--rate",
                    "10",
                    "--seconds",
                    "5" if q else "20",
                    "--idle-window-s",
                    "5" if q else "10",
                    "--limit-s",
                    str(PIPELINE_LIMIT_S - 60),
                ],
                PIPELINE_LIMIT_S,
                t,
            ),
            "fanout": _bench("fanout", ["--devices", "2000" if q else "10000"], 300, t),
            "shards": _bench(
                "shards",
                ["--devices", "20000", "--shard-size", "5000"] if q else ["--devices", "100000"],
                900,
                t,
            ),
            "aggregator": _bench("aggregator", ["--events", "2000" if q else "20000"], 180, t),
            "floor": _bench("floor", ["--runs", "100" if q else "300"], 180, t),
            # Only with `make cluster-up`; otherwise its row says n/a.
            "knative": _bench("knative", ["--runs", "3" if q else "5"], 900, t),
        }
    table = rows(results)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine() | {"load_avg_before": load_before},
        "elapsed_s": round(time.monotonic() - started, 1),
        "quick": q,
        "table": table,
        "results": results,
    }
    print()
    print(render(table))
    print()
    print(render_split(results))
    print(
        f"\n{report['machine']['cores']} cores, {report['machine']['cpu_model']}, "
        f"{report['machine']['ram_gb']} GB RAM, Python {report['machine']['python']}; "
        f"load {load_before} before, {report['machine']['load_avg']} after; "
        f"{report['elapsed_s']:.0f} s"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
