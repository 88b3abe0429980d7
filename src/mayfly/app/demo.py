"""``mayfly demo``: the whole pipeline on one machine, no server installed.

It builds, signs and publishes the example packages into a fresh Mayfly home,
starts the local runtime (embedded event log, warm-parent coordinators,
aggregator) and a simulated fleet, publishes a mix of requests over all three
priority lanes, shows progress until every request has a result or a
rejection, then prints the fleet report and where the traces went.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mayfly.app.local import Runtime
from mayfly.app.publishing import ensure_signing_key, publish_folder
from mayfly.app.wiring import build_aggregator, open_repository
from mayfly.eventlog.publisher import publish_request
from mayfly.events import MayflyEvent, TaskCompleted, TaskRejected, TaskRequest, new_request
from mayfly.runtime.dispatcher import DispatchEvent
from mayfly.settings import (
    ENV_EVENT_LOG,
    ENV_HOME,
    ENV_INVENTORY,
    ENV_STORE,
    ENV_TOPIC_PREFIX,
    ENV_TRACE_FILE,
    Settings,
)

__all__ = ["DemoPlan", "demo_requests", "run_demo"]

TASKPKGS = Path(__file__).resolve().parents[3] / "taskpkgs"
SITES = ("lab-a", "lab-b", "lab-c")


@dataclass(frozen=True)
class DemoPlan:
    home: Path
    devices: int = 200
    broken: float = 0.03
    failure_rate: float = 0.02
    timeout_s: float = 110.0
    event_log: str | None = None
    """``kafka://HOST:PORT`` to run on Kafka; default the embedded log."""
    store: str | None = None
    """``s3://BUCKET`` to keep packages in S3 (MAYFLY_S3_* set); default a folder."""
    jaeger_url: str | None = None
    """Jaeger's query UI, to print the link of one trace."""
    taskpkgs: Path = TASKPKGS
    echo: Callable[[str], None] = print


def demo_requests(device_ids: Sequence[str]) -> list[TaskRequest]:
    """A morning in the life of a fleet: updates, config pushes, reboots, one typo."""
    reqs = [
        # Canary ring first, fast lane.
        new_request(
            "firmware-update",
            selector={"ring": "canary"},
            params={"version": "2.0.0"},
            priority="high",
        ),
    ]
    reqs += [
        new_request(
            "firmware-update", selector={"site": site, "model": "m1"}, params={"version": "2.0.0"}
        )
        for site in SITES
    ]
    reqs += [
        new_request(
            "config-push",
            selector={"site": site},
            params={"config": {"log_level": "info", "telemetry_interval_s": 60}},
            priority="low",
        )
        for site in SITES
    ]
    reqs += [
        new_request(
            "config-push",
            selector={"model": "m2"},
            params={"config": {"ntp_server": "ntp.lab.example"}},
        )
    ]
    reqs += [
        new_request("reboot", devices=[device_id], priority="low")
        for device_id in device_ids[:: max(1, len(device_ids) // 12)][:12]
    ]
    reqs += [new_request("reboot", devices=list(device_ids[-3:]), priority="high")]
    # An operator's typo: the package's schema refuses it, and says why.
    reqs += [
        new_request(
            "config-push", devices=[device_ids[0]], params={"config": {"log_level": "loud"}}
        )
    ]
    return reqs


@dataclass
class _Progress:
    expected: set[str]
    results: dict[str, MayflyEvent] = field(default_factory=dict)
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, events: list[MayflyEvent]) -> None:
        with self.lock:
            for event in events:
                if isinstance(event, TaskCompleted | TaskRejected) and event.request_id:
                    self.results[event.request_id] = event

    def done(self) -> bool:
        with self.lock:
            return self.expected <= set(self.results)

    def line(self, elapsed: float) -> str:
        with self.lock:
            statuses: Counter[str] = Counter()
            devices = 0
            for event in self.results.values():
                if isinstance(event, TaskCompleted):
                    statuses[str(event.status)] += 1
                    devices += len(event.devices)
                else:
                    statuses["rejected"] += 1
            shown = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "-"
            return (
                f"requests {len(self.results)}/{len(self.expected)} ({shown}) | "
                f"{self.running} running | {devices} device runs | {elapsed:5.1f} s"
            )


def _prepare_home(plan: DemoPlan) -> Settings:
    if plan.home.exists():
        shutil.rmtree(plan.home)
    # The demo's own home and topics; S3 credentials and the OTLP endpoint are the user's.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MAYFLY_") or k.startswith("MAYFLY_S3_")
    }
    env[ENV_HOME] = str(plan.home)
    env[ENV_INVENTORY] = str(plan.home / "inventory.json")
    env[ENV_TRACE_FILE] = str(plan.home / "traces.otlp.jsonl")
    if plan.event_log:
        env[ENV_EVENT_LOG] = plan.event_log
        # Fresh topics per run: a shared cluster's older requests stay out of it.
        env[ENV_TOPIC_PREFIX] = f"mayfly-demo-{uuid.uuid4().hex[:8]}"
    if plan.store:
        env[ENV_STORE] = plan.store
    settings = Settings.from_env(env)
    ensure_signing_key(settings)
    repo = open_repository(settings)
    for name in ("reboot", "firmware-update", "config-push"):
        published = publish_folder(settings, plan.taskpkgs / name, repository=repo)
        plan.echo(
            f"  published {name} {published.manifest.version} {published.digest[:19]}... "
            f"to {repo.store.describe()}"
        )
    return settings


def run_demo(plan: DemoPlan, report: Callable[[Settings], None] | None = None) -> int:
    """Run the demo; 0 only when every published request is accounted for."""
    from mayfly.devices.sim import Simulator, SimulatorServer

    echo = plan.echo
    echo(f"== Mayfly demo in {plan.home}")
    settings = _prepare_home(plan)
    progress = _Progress(expected=set())

    def on_dispatch(kind: DispatchEvent, _info: dict[str, object]) -> None:
        with progress.lock:
            progress.running += {
                DispatchEvent.STARTED: 1,
                DispatchEvent.FINISHED: -1,
                DispatchEvent.DEAD_LETTERED: -1,
                DispatchEvent.DEFERRED: -1,
            }.get(kind, 0)

    runtime = Runtime(settings, on_dispatch=on_dispatch)
    # The warm parent is forked first, while this process has one thread:
    # telemetry's export threads and the simulator's server start after it.
    runtime.spawner.start()
    aggregation = build_aggregator(settings, on_events=progress.add)
    runtime.ingest = aggregation.ingest
    runtime.start()
    simulator = Simulator(
        plan.devices,
        reboot_time=0.3,
        download_time=0.5,
        failure_rate=plan.failure_rate,
        broken=plan.broken,
        seed=42,
    )
    server = SimulatorServer(simulator).start()
    code = 1
    try:
        Path(settings.inventory).write_bytes(server.inventory().to_json())
        echo(
            f"  {plan.devices} simulated devices at {server.url} "
            f"({len(simulator.broken_ids)} set to fail, {plan.failure_rate:.0%} flaky answers)"
        )
        from mayfly.telemetry import configure_telemetry  # the SDK: only where traces are made

        # The publisher's spans say who made them: a service of their own.
        publishing = configure_telemetry(
            "mayfly-publisher", otlp_endpoint=settings.otlp_endpoint, trace_file=settings.trace_file
        )
        try:
            publisher = publishing.tracer("mayfly.publisher")
            requests = [
                publish_request(runtime.log, request, publisher, settings.topics)
                for request in demo_requests(simulator.device_ids())
            ]
        finally:
            publishing.shutdown()
        progress.expected = {r.id for r in requests}
        lanes = Counter(str(r.priority) for r in requests)
        echo(
            f"== published {len(requests)} requests "
            f"({', '.join(f'{n} {p}' for p, n in sorted(lanes.items()))})"
        )
        code = _serve(runtime, progress, plan)
    finally:
        runtime.close()
        server.stop()
        aggregation.close()
    echo("")
    if report is not None:
        report(settings)
    if settings.otlp_endpoint:
        echo(
            f"traces: sent to {settings.otlp_endpoint}"
            " (services mayfly-publisher and mayfly-aggregator)"
        )
        example = _example_trace(progress)
        if plan.jaeger_url and example:
            echo(f"one trace in Jaeger: {plan.jaeger_url.rstrip('/')}/trace/{example}")
    else:
        echo(
            f"traces: {settings.trace_file} (OTLP JSON; set OTEL_EXPORTER_OTLP_ENDPOINT for Jaeger)"
        )
    echo(f"results archive: {aggregation.archive.describe()}   event log: {runtime.log.describe()}")
    missing = progress.expected - set(progress.results)
    if missing:
        echo(f"NOT accounted for: {len(missing)} request(s): {', '.join(sorted(missing)[:5])}")
        return 1
    echo(f"every one of the {len(progress.expected)} requests is accounted for")
    return code


def _serve(runtime: Runtime, progress: _Progress, plan: DemoPlan) -> int:
    started = time.monotonic()
    tty = sys.stdout.isatty()
    last = 0.0

    def should_stop() -> bool:
        nonlocal last
        now = time.monotonic()
        if now - last >= (0.25 if tty else 2.0):
            last = now
            line = progress.line(now - started)
            if tty:
                sys.stdout.write(f"\r  {line}   ")
                sys.stdout.flush()
            else:
                plan.echo(f"  {line}")
        return progress.done() or now - started > plan.timeout_s

    runtime.run(should_stop)
    if tty:
        sys.stdout.write("\n")
    plan.echo(f"  {progress.line(time.monotonic() - started)}")
    return 0 if progress.done() else 1


def _example_trace(progress: _Progress) -> str | None:
    """The trace id of the completed request with the most devices."""
    completed = [e for e in progress.results.values() if isinstance(e, TaskCompleted)]
    completed.sort(key=lambda e: len(e.devices), reverse=True)
    for event in completed:
        if event.traceparent:
            return event.traceparent.split("-")[1]
    return None
