"""The coordinator's entry points over one core: job mode and HTTP (Knative).

Job mode (``python -m mayfly.coordinator``) reads one request from the
environment, as the original design had it, or from a CloudEvent file
(Knative JobSink mounts it at ``/etc/jobsink-event/event``; ``K_EVENT_PATH``
points elsewhere)::

    TASK_TYPE        task (package) name                     required
    TASK_ID          request id = idempotency key            default: a new uuid
    DEVICE_IDS       comma-separated device ids
    DEVICE_SELECTOR  label selector, ``key=value,key=value``
    TASK_PARAMS      params as a JSON object                 default {}
    TASK_VERSION     package version, or TASK_CHANNEL        default channel stable
    TASK_PRIORITY    high | normal | low                     default normal

Exit codes of job mode (also in ``mayfly.coordinator.ExitCode``):

    0  every device succeeded          4  no device succeeded (or canceled)
    1  internal error                  5  request rejected (task.rejected emitted)
    2  bad configuration               6  result could not be delivered
    3  partial: some devices failed
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

from mayfly.backends import inventory_loader, open_repository
from mayfly.coordinator.core import Coordinator, CoordinatorOptions
from mayfly.coordinator.sinks import ResultSink, deliver, open_sink
from mayfly.devices.http import HttpDriver
from mayfly.errors import EventError, MayflyError, SinkError
from mayfly.events import (
    OverallStatus,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    from_http,
    new_request,
    peek_attributes,
    rejection_for,
    split_completed,
    to_http,
)
from mayfly.settings import Settings

__all__ = [
    "JOBSINK_EVENT_PATH",
    "ExitCode",
    "HttpAnswer",
    "build_coordinator",
    "exit_code_for",
    "handle_http",
    "request_from_env",
    "run_job",
    "summarize",
]

JOBSINK_EVENT_PATH = "/etc/jobsink-event/event"
_LOG = logging.getLogger("mayfly.coordinator")


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    CONFIG = 2
    PARTIAL = 3
    FAILED = 4
    REJECTED = 5
    UNDELIVERED = 6


HttpAnswer = tuple[int, dict[str, str], bytes]


def build_coordinator(settings: Settings, mode: str) -> Coordinator:
    """A coordinator wired to the configured store, inventory and HTTP devices."""
    repository = open_repository(settings)
    return Coordinator(
        repository,
        inventory=inventory_loader(settings),
        driver_factory=HttpDriver,
        options=CoordinatorOptions(
            cache_dir=settings.package_cache, mode=mode, max_processes=settings.max_processes
        ),
    )


def exit_code_for(outcome: TaskCompleted | TaskRejected) -> ExitCode:
    if isinstance(outcome, TaskRejected):
        return ExitCode.REJECTED
    return {
        OverallStatus.SUCCEEDED: ExitCode.OK,
        OverallStatus.PARTIAL: ExitCode.PARTIAL,
    }.get(outcome.status, ExitCode.FAILED)


def request_from_env(env: Mapping[str, str]) -> TaskRequest:
    """The request described by ``TASK_*`` variables or a CloudEvent file.

    Raises:
        EventError: naming the variable or field at fault.
    """
    event_path = env.get("K_EVENT_PATH") or (
        JOBSINK_EVENT_PATH
        if not env.get("TASK_TYPE") and Path(JOBSINK_EVENT_PATH).exists()
        else None
    )
    if event_path:
        try:
            body = Path(event_path).read_bytes()
        except OSError as exc:
            raise EventError("K_EVENT_PATH", f"cannot read {event_path}: {exc.strerror}") from exc
        event = from_http({"content-type": "application/cloudevents+json"}, body)
        if not isinstance(event, TaskRequest):
            raise EventError("type", f"{event_path} holds a {event.event_type}, not a request")
        return event
    task = env.get("TASK_TYPE")
    if not task:
        raise EventError("TASK_TYPE", "set TASK_TYPE (the task name) or K_EVENT_PATH")
    try:
        params = json.loads(env.get("TASK_PARAMS") or "{}")
    except ValueError as exc:
        raise EventError("TASK_PARAMS", f"not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise EventError("TASK_PARAMS", "must be a JSON object")
    selector: dict[str, str] = {}
    for pair in filter(None, (env.get("DEVICE_SELECTOR") or "").split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise EventError("DEVICE_SELECTOR", f"{pair!r} is not key=value")
        selector[key.strip()] = value.strip()
    devices = [d.strip() for d in (env.get("DEVICE_IDS") or "").split(",") if d.strip()]
    return new_request(
        task,
        devices=devices,
        selector=selector or None,
        params=params,
        version=env.get("TASK_VERSION") or None,
        channel=env.get("TASK_CHANNEL") or None,
        priority=env.get("TASK_PRIORITY") or "normal",
        request_id=env.get("TASK_ID") or None,
        traceparent=env.get("TRACEPARENT") or None,
    )


def _process_start() -> datetime:
    """When this process started: job mode's cold start counts from here."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return datetime.fromtimestamp(datetime.now(UTC).timestamp() - age, UTC)
    except (OSError, ValueError, IndexError):
        return datetime.now(UTC)


def summarize(outcome: TaskCompleted | TaskRejected) -> str:
    """One line: the outcome and how many devices ended in each status."""
    if isinstance(outcome, TaskRejected):
        return f"rejected ({outcome.code}): {outcome.reason}"
    counts: dict[str, int] = {}
    for device in outcome.devices:
        counts[device.status] = counts.get(device.status, 0) + 1
    shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{outcome.task} {outcome.package.version}: {outcome.status} ({shown})"


def run_job(env: Mapping[str, str] | None = None) -> int:
    """Job mode: run one request, deliver the result, return the exit code."""
    env = os.environ if env is None else env
    received_at = _process_start()
    try:
        settings = Settings.from_env(env)
        sink = open_sink(settings.result_sink)
        coordinator = build_coordinator(settings, "job")
    except MayflyError as exc:
        print(f"mayfly coordinator: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        request = request_from_env(env)
    except EventError as exc:
        outcome: TaskCompleted | TaskRejected = rejection_for(
            exc, {"tasktype": env.get("TASK_TYPE"), "id": env.get("TASK_ID")}
        )
    else:
        # SIGTERM (Job deletion, pod eviction) cancels cleanly: the devices
        # still running end "canceled" and the result is still delivered.
        signal.signal(signal.SIGTERM, lambda *_: coordinator.cancel())
        outcome = coordinator.handle(request, received_at=received_at)
    return _deliver(sink, outcome)


def _deliver(sink: ResultSink, outcome: TaskCompleted | TaskRejected) -> int:
    try:
        deliver(sink, outcome)
    except SinkError as exc:
        print(f"mayfly coordinator: {exc}", file=sys.stderr)
        return ExitCode.UNDELIVERED
    finally:
        sink.close()
    print(f"mayfly coordinator: {summarize(outcome)}", file=sys.stderr)
    return exit_code_for(outcome)


def handle_http(
    coordinator: Coordinator, sink: ResultSink | None, headers: Mapping[str, str], body: bytes
) -> HttpAnswer:
    """One CloudEvent delivery over HTTP (Knative Service), answered properly.

    The answer is an empty 202 or a reply CloudEvent, never a plain-text body:
    a Kafka Broker Trigger counts a non-CloudEvent body as a failed delivery.
    With a sink (``K_SINK``), results go there and the answer is 202. Without
    one, the result is the reply event, which a Broker routes onwards.
    """
    received_at = datetime.now(UTC)
    try:
        event = from_http(dict(headers), body)
    except EventError as exc:
        outcome: TaskCompleted | TaskRejected = rejection_for(
            exc, peek_attributes(dict(headers), body)
        )
    else:
        if not isinstance(event, TaskRequest):
            return 202, {}, b""  # not ours to run (a result or rejection on the same broker)
        outcome = coordinator.handle(event, received_at=received_at)
    if sink is not None:
        try:
            deliver(sink, outcome)
        except SinkError:
            _LOG.exception("result not delivered; answering 503 so the event is redelivered")
            return 503, {}, b""
        return 202, {}, b""
    parts = split_completed(outcome) if isinstance(outcome, TaskCompleted) else (outcome,)
    if len(parts) > 1:
        _LOG.error(
            "result of %s needs %d events; set K_SINK for large fan-outs", parts[0].id, len(parts)
        )
        return 500, {}, b""
    reply_headers, reply_body = to_http(parts[0], "binary")
    return 200, reply_headers, reply_body
