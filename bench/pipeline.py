"""Throughput, latency under load and idle footprint, against Celery with Redis.

Every request is one HTTP action (``config-push``) on one simulated device;
the simulator runs in its own process. Three systems, one after the other so
they never share the two cores:

- **Mayfly on real Kafka** (`make up`'s broker): ``mayfly up`` as a user runs
  it, under a topic prefix of its own, traces to the real Jaeger;
- **Mayfly's local runtime** (SQLite event log), for latency;
- **Celery** 5 with a Redis broker and result backend (a throwaway
  ``redis-server``), default prefork pool of one worker process per core,
  doing the same action through the same HTTP driver.

For each: a burst of requests published as fast as the publisher can
(throughput: requests / (last result - first publish)), then a fixed rate
for a fixed time (latency, publish to result, p50/p99). After the load and a
settle, the idle footprint: Mayfly's coordinator processes still alive and the
dispatcher's RSS; Celery's persistent processes and their RSS; then the CPU
each process tree uses over a fixed window while nothing is asked of it
(``mayfly up`` and everything under it; Celery's main process and its pool
workers, with the Redis server reported on its own), as percent of one core.

    python bench/pipeline.py [--burst N] [--rate R] [--seconds S]
                             [--idle-window-s W] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PYTHON,
    Child,
    descendants,
    mayfly_env,
    percentile,
    publish_packages,
    redis_server,
    rss_mb,
    service_env,
    simulator,
    write_json,
)

from mayfly.app.wiring import open_event_log
from mayfly.devices import parse_inventory
from mayfly.eventlog.publisher import publish_request
from mayfly.events import TaskCompleted, from_kafka, new_request
from mayfly.settings import Settings

FLEET = 2000
RESULT_TIMEOUT_S = 120.0
SETTLE_S = 3.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks (0 when gone).

    cutime and cstime hold the CPU of the children it waited for, so a tree's
    sum keeps the CPU of processes that exit (and are reaped) inside the window.
    """
    try:
        # Fields after the command name (which may hold spaces): state is field
        # 3, utime, stime, cutime, cstime are 14 to 17.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15])
    except (OSError, IndexError, ValueError):
        return 0


def _stat(pid: int) -> list[int]:
    """minflt, cminflt, utime, stime, cutime, cstime of one process (zeros when gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return [int(fields[i]) for i in (7, 8, 11, 12, 13, 14)]
    except (OSError, IndexError, ValueError):
        return [0] * 6


class CpuSplit:
    """CPU per request by process over a load, and minor faults.

    The warm parent waits for every coordinator it forks, the task zygote for
    every task process, so their cutime, cstime and cminflt hold those
    children's once they exited: read after the last result and a short settle.
    """

    def __init__(
        self,
        dispatcher: int,
        warm_parent: int | None,
        simulator: int | None,
        zygote: int | None = None,
    ) -> None:
        self.pids = {
            "dispatcher": dispatcher,
            "warm_parent": warm_parent,
            "simulator": simulator,
            "task_zygote": zygote,
        }
        self._start = {name: _stat(pid) for name, pid in self.pids.items() if pid}

    def per_request(self, requests: int) -> dict[str, float]:
        time.sleep(0.5)  # serving coordinators exit as soon as none is waiting
        d = {
            name: [b - a for a, b in zip(self._start[name], _stat(pid), strict=True)]
            for name, pid in self.pids.items()
            if pid
        }
        ms = 1000 / CLK_TCK / max(requests, 1)
        out = {"dispatcher_cpu_ms": round((d["dispatcher"][2] + d["dispatcher"][3]) * ms, 2)}
        if "warm_parent" in d:
            w = d["warm_parent"]
            out["warm_parent_cpu_ms"] = round((w[2] + w[3]) * ms, 2)
            # Task processes too when they were forked from their coordinator.
            out["coordinators_cpu_ms"] = round((w[4] + w[5]) * ms, 2)
            out["coordinator_minor_faults"] = round(w[1] / max(requests, 1), 1)
        if "task_zygote" in d:
            z = d["task_zygote"]
            out["task_zygote_cpu_ms"] = round((z[2] + z[3]) * ms, 2)
            out["task_processes_cpu_ms"] = round((z[4] + z[5]) * ms, 2)
            out["task_minor_faults"] = round(z[1] / max(requests, 1), 1)
        if "simulator" in d:
            out["simulator_cpu_ms"] = round((d["simulator"][2] + d["simulator"][3]) * ms, 2)
        return out


def _tree_ticks(pid: int) -> int:
    return sum(_cpu_ticks(p) for p in (pid, *descendants(pid)))


def idle_cpu(roots: dict[str, int], window_s: float) -> dict[str, float]:
    """CPU of each process tree (by its root pid) over one window, percent of one core.

    All trees are sampled over the same window. The resolution is one clock
    tick per process (1/CLK_TCK s): 0.1 % of a core per process over 10 s.
    """
    start = {name: _tree_ticks(pid) for name, pid in roots.items()}
    began = time.monotonic()
    time.sleep(window_s)
    end = {name: _tree_ticks(pid) for name, pid in roots.items()}
    elapsed = time.monotonic() - began
    return {
        name: round(100 * max(0, end[name] - start[name]) / CLK_TCK / elapsed, 2) for name in roots
    }


def _rate_schedule(count: int, rate: float | None) -> Callable[[int], None]:
    """Sleeps until request ``i`` is due (no-op for a burst)."""
    start = time.monotonic()

    def wait(i: int) -> None:
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    return wait


def _summary(published: dict[str, float], done: dict[str, float], ok: int) -> dict[str, Any]:
    latencies = [(done[k] - published[k]) * 1000 for k in done if k in published]
    first = min(published.values()) if published else 0.0
    last = max(done.values()) if done else first
    span = max(last - first, 1e-9)
    return {
        "requests": len(published),
        "results": len(done),
        "succeeded": ok,
        "seconds": round(span, 3),
        "rate_per_s": round(len(done) / span, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
    }


def _stages(
    stages: dict[str, list[float]], event: TaskCompleted, published: float, read: float
) -> None:
    """Where one request's publish-to-result time went (wall clock of this
    machine, ``time.time()``, against the result's own timings): queued
    (publish call to the dispatcher handing it to a coordinator), started (its
    cold start: to the first device's task code), ran (to the result made),
    delivered (its append and this reader's poll)."""
    t = event.timings
    received = t.received_at.timestamp()
    started = received + (t.cold_start_ms or 0.0) / 1000
    marks = (published, received, started, t.finished_at.timestamp(), read)
    for name, a, b in zip(stages, marks, marks[1:], strict=False):
        stages[name].append((b - a) * 1000)


# -- Mayfly ---------------------------------------------------------------------


class MayflyTarget:
    def __init__(
        self, root: Path, env: dict[str, str], devices: list[str], simulator: int | None = None
    ) -> None:
        self.simulator = simulator
        self.env = env
        self.devices = devices
        self.settings = Settings.from_env(env)
        self.up = Child("mayfly up", [PYTHON, "-m", "mayfly", "up"], root / "up.log", env)
        self.up.wait_for(r"mayfly up: event log", 90)
        self.log = open_event_log(self.settings)
        self.results = self.log.consumer(
            f"bench-{uuid.uuid4().hex[:8]}", self.settings.topics.results
        )

    def load(self, count: int, rate: float | None) -> dict[str, Any]:
        published: dict[str, float] = {}
        published_wall: dict[str, float] = {}
        done: dict[str, float] = {}
        stages: dict[str, list[float]] = {"queued": [], "started": [], "ran": [], "delivered": []}
        ok = 0
        wait = _rate_schedule(count, rate)
        requests = [
            new_request("bench-push", devices=[self.devices[i % len(self.devices)]])
            for i in range(count)
        ]

        def publish() -> None:
            for i, request in enumerate(requests):
                wait(i)
                published[request.id] = time.monotonic()
                published_wall[request.id] = time.time()
                publish_request(self.log, request, None, self.settings.topics)

        warm = self._warm_parent()
        cpu = CpuSplit(self.up.pid, warm, self.simulator, self._zygote(warm))
        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        wanted = {r.id for r in requests}
        deadline = time.monotonic() + RESULT_TIMEOUT_S + (count / rate if rate else 0)
        while len(done) < count and time.monotonic() < deadline:
            for record in self.results.poll(500, 0.05):
                now = time.monotonic()
                event = from_kafka(record.headers, record.key, record.value)
                if event.request_id in wanted and event.request_id not in done:
                    done[event.request_id] = now
                    ok += isinstance(event, TaskCompleted) and event.status == "succeeded"
                    if isinstance(event, TaskCompleted):
                        _stages(stages, event, published_wall[event.request_id], time.time())
        publisher.join(5)
        # The publisher's appends are this process's CPU, not counted here.
        return _summary(published, done, ok) | {
            "per_request": cpu.per_request(len(done)),
            "stages_p50_ms": {k: round(percentile(v, 50), 1) for k, v in stages.items() if v},
        }

    def idle(self, window_s: float, settle_s: float = SETTLE_S) -> dict[str, Any]:
        time.sleep(settle_s)
        tree = descendants(self.up.pid)
        warm = self._warm_parent()
        zygote = self._zygote(warm)
        exporters = [p for p in _children_of(self.up.pid) if _is_span_exporter(p)]
        coordinators = [p for p in tree if p not in (warm, zygote) and p not in exporters]
        footprint = {
            "coordinators_alive": len(coordinators),
            "dispatcher_rss_mb": round(rss_mb(self.up.pid), 1),
            "warm_parent_rss_mb": round(rss_mb(warm), 1) if warm else 0.0,
            "task_zygote_rss_mb": round(rss_mb(zygote), 1) if zygote else 0.0,
            "span_exporter_rss_mb": round(sum(rss_mb(p) for p in exporters), 1),
            "processes": 1 + len(tree),
        }
        cpu = idle_cpu({"up": self.up.pid}, window_s)
        return footprint | {"idle_cpu_pct": cpu["up"], "idle_cpu_window_s": window_s}

    def _warm_parent(self) -> int | None:
        """The child of ``mayfly up`` that is not its span exporter."""
        found = [p for p in _children_of(self.up.pid) if not _is_span_exporter(p)]
        return found[0] if found else None

    def _zygote(self, warm: int | None) -> int | None:
        """The warm parent's task zygote (``python -m mayfly.coordinator.zygote``)."""
        if warm is None:
            return None
        found = [p for p in _children_of(warm) if _has_in_cmdline(p, b"mayfly.coordinator.zygote")]
        return found[0] if found else None

    def close(self) -> None:
        self.results.close()
        self.log.close()
        self.up.stop()


def _children_of(pid: int) -> list[int]:
    from _common import children

    return children(pid)


def _has_in_cmdline(pid: int, word: bytes) -> bool:
    try:
        return word in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _is_span_exporter(pid: int) -> bool:
    """The aggregator's export process (``python -m mayfly.spanexport``)."""
    return _has_in_cmdline(pid, b"mayfly.spanexport")


# -- Celery ---------------------------------------------------------------------


class CeleryTarget:
    def __init__(self, root: Path, redis_url: str, fleet: dict[str, str]) -> None:
        os.environ["MAYFLY_BENCH_REDIS"] = redis_url
        import celery_app

        self.app = celery_app.app
        self.push = celery_app.push
        self.fleet = fleet
        self.devices = list(fleet)
        self.redis_url = redis_url
        env = dict(os.environ) | {
            "MAYFLY_BENCH_REDIS": redis_url,
            "PYTHONPATH": str(Path(__file__).resolve().parent),
        }
        self.worker = Child(
            "celery worker",
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(os.cpu_count() or 1),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            root / "celery.log",
            env,
        )
        deadline = time.monotonic() + 60
        while not self.app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or not self.worker.alive():
                raise RuntimeError(f"the Celery worker did not start: {self.worker.log}")
        # First tasks pay for imports in the pool processes; not what we measure.
        self.push.delay(self.devices[0], fleet[self.devices[0]], uuid.uuid4().hex).get(30)

    def load(self, count: int, rate: float | None) -> dict[str, Any]:
        from celery.result import AsyncResult

        published: dict[str, float] = {}
        done: dict[str, float] = {}
        wait = _rate_schedule(count, rate)
        ids: list[str] = []
        lock = threading.Condition()

        def publish() -> None:
            for i in range(count):
                wait(i)
                device = self.devices[i % len(self.devices)]
                key = uuid.uuid4().hex
                published[key] = time.monotonic()
                # The task id is the key: the collector makes its own handle
                # (Celery's result backend is per thread).
                self.push.apply_async((device, self.fleet[device], key), task_id=key)
                with lock:
                    ids.append(key)
                    lock.notify()

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        ok = 0
        deadline = time.monotonic() + RESULT_TIMEOUT_S + (count / rate if rate else 0)
        for i in range(count):
            with lock:
                while len(ids) <= i and time.monotonic() < deadline:
                    lock.wait(1.0)
                if len(ids) <= i:
                    break
                key = ids[i]
            try:
                value = AsyncResult(key, app=self.app).get(
                    timeout=max(0.1, deadline - time.monotonic())
                )
            except Exception:  # a timeout or a failed task: counted as missing
                continue
            done[key] = time.monotonic()
            ok += value == "config-push"
        publisher.join(5)
        # Pending-result handles unsubscribe when collected: while Redis still
        # answers, or each one retries its reconnect for seconds at exit.
        gc.collect()
        return _summary(published, done, ok)

    def idle(self, window_s: float, settle_s: float = SETTLE_S) -> dict[str, Any]:
        time.sleep(settle_s)
        tree = [self.worker.pid, *descendants(self.worker.pid)]
        footprint = {
            "processes": len(tree),
            "rss_mb": round(sum(rss_mb(p) for p in tree), 1),
            "main_rss_mb": round(rss_mb(self.worker.pid), 1),
        }
        roots = {"celery": self.worker.pid}
        redis = _redis_pid(self.redis_url)
        if redis is not None:
            roots["redis"] = redis
        cpu = idle_cpu(roots, window_s)
        return footprint | {
            "idle_cpu_pct": cpu["celery"],
            "redis_idle_cpu_pct": cpu.get("redis"),
            "idle_cpu_window_s": window_s,
        }

    def close(self) -> None:
        self.worker.stop()


def _redis_pid(url: str) -> int | None:
    """The redis-server this run started (a child of this process) for ``url``."""
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    for pid in _children_of(os.getpid()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Its arguments (``--port N``), or its title once it runs (``host:N``).
        if comm == "redis-server" and port in cmdline.replace(":", " ").split():
            return pid
    return None


# -- the run --------------------------------------------------------------------


def _celery(
    root: Path,
    addresses: dict[str, str],
    burst: int,
    steady: int,
    rate: float,
    idle_window_s: float,
) -> dict[str, Any]:
    with redis_server(root) as redis_url:
        celery = CeleryTarget(root, redis_url, addresses)
        try:
            return {
                "throughput": celery.load(burst, None),
                "latency": celery.load(steady, rate),
                "idle": celery.idle(idle_window_s),
                "concurrency": os.cpu_count(),
            }
        finally:
            celery.close()


SYSTEMS = (
    "celery",
    "mayfly_kafka",
    "mayfly_sqlite",
    "mayfly_kafka_strict",
    "mayfly_sqlite_strict",
)


def _mayfly(
    home: Path,
    simulator: int,
    inventory: Path,
    devices: list[str],
    log: str,
    otlp: str | None,
    mode: str,
    burst: int,
    steady: int,
    rate: float,
    idle_window_s: float,
) -> dict[str, Any]:
    extra = {
        "MAYFLY_TOPIC_PREFIX": f"bench-{uuid.uuid4().hex[:8]}",
        "MAYFLY_COORDINATOR_MODE": mode,
    }
    if log:
        extra["MAYFLY_EVENT_LOG"] = log
    if otlp:
        extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp
    env = mayfly_env(home, inventory, **extra)
    publish_packages(env)
    target = MayflyTarget(home, env, devices, simulator)
    try:
        settings = target.settings
        found: dict[str, Any] = {"throughput": target.load(burst, None)}
        if mode == "serve":
            found["latency"] = target.load(steady, rate)
            found["idle"] = target.idle(idle_window_s)
        return found | {
            "coordinator_mode": mode,
            "max_coordinators": settings.max_coordinators,
            "per_task_cap": settings.per_task_cap,
            "event_log": target.log.describe(),
        }
    finally:
        target.close()


def run(
    root: Path,
    burst: int,
    rate: float,
    seconds: float,
    only: set[str] | None = None,
    idle_window_s: float = 10.0,
) -> dict[str, Any]:
    services = service_env()
    bootstrap = services.get("MAYFLY_TEST_KAFKA_BOOTSTRAP")
    otlp = services.get("MAYFLY_TEST_OTLP_ENDPOINT")
    out: dict[str, Any] = {
        "fleet": FLEET,
        "burst_requests": burst,
        "fixed_rate_per_s": rate,
        "fixed_rate_seconds": seconds,
        "idle_settle_s": SETTLE_S,
        "idle_cpu_window_s": idle_window_s,
    }
    steady = round(rate * seconds)
    with simulator(root, FLEET) as fleet:
        inventory = parse_inventory(fleet.inventory.read_bytes())
        addresses = {d.id: d.address for d in inventory}
        devices = list(addresses)

        if only is None or "celery" in only:
            out["celery"] = _celery(root, addresses, burst, steady, rate, idle_window_s)

        runs = []
        if bootstrap:
            runs.append(("kafka", f"kafka://{bootstrap}"))
        else:
            out["kafka_skipped"] = "no Kafka: run `make up` first"
        runs.append(("sqlite", ""))
        # The default (serve) mode through every phase; strict mode (one
        # coordinator process per request) for the burst only, beside it.
        for mode in ("serve", "strict"):
            for name, log in runs:
                system = f"mayfly_{name}" + ("_strict" if mode == "strict" else "")
                if only is not None and system not in only:
                    continue
                out[system] = _mayfly(
                    root / system, fleet.child.pid, fleet.inventory, devices, log, otlp, mode,
                    burst, steady, rate, idle_window_s,
                )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=600, help="requests in the burst")
    parser.add_argument("--rate", type=float, default=20.0, help="fixed rate, requests/s")
    parser.add_argument("--seconds", type=float, default=15.0, help="fixed-rate duration")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SYSTEMS),
    )
    parser.add_argument(
        "--idle-window-s",
        type=float,
        default=10.0,
        help="window over which idle CPU is sampled, after the settle",
    )
    parser.add_argument("--limit-s", type=int, default=600, help="hard stop of the whole run")
    args = parser.parse_args()
    import signal
    import tempfile

    def overrun(*_: object) -> None:
        raise TimeoutError(f"pipeline benchmark over its {args.limit_s} s limit")

    # Bounded whatever happens; raising (not dying) lets every server stop.
    signal.signal(signal.SIGALRM, overrun)
    signal.alarm(args.limit_s)

    with tempfile.TemporaryDirectory(prefix="mayfly-bench-pipeline-") as tmp:
        out = run(
            Path(tmp),
            args.burst,
            args.rate,
            args.seconds,
            set(args.only) if args.only else None,
            args.idle_window_s,
        )
    for system in SYSTEMS:
        if system in out:
            row = out[system]
            t = row["throughput"]
            if "latency" not in row:
                print(
                    f"{system:<20} burst {t['rate_per_s']:>7.1f}/s ({t['results']}/"
                    f"{t['requests']} in {t['seconds']} s)  {t.get('per_request')}"
                )
                continue
            lat, idle = row["latency"], dict(row["idle"])
            cpu = f"idle CPU {idle.pop('idle_cpu_pct'):.2f}% of a core"
            redis = idle.pop("redis_idle_cpu_pct", None)
            if redis is not None:
                cpu += f" (redis-server {redis:.2f}%)"
            cpu += f" over {idle.pop('idle_cpu_window_s'):g} s"
            print(
                f"{system:<20} burst {t['rate_per_s']:>7.1f}/s ({t['results']}/{t['requests']} "
                f"in {t['seconds']} s)  at {args.rate:g}/s p50 {lat['p50_ms']} ms "
                f"p99 {lat['p99_ms']} ms  {cpu}  idle {idle}"
            )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
