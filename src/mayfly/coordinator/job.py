"""Job mode's transport: one request from the environment or a CloudEvent file.

``python -m mayfly.coordinator`` reads one request from the environment, as
the original design had it, or from a CloudEvent file (Knative JobSink mounts
it at ``/etc/jobsink-event/event`` and sets ``K_EVENT_PATH`` to that folder;
``K_EVENT_PATH`` may name the file itself too)::

    TASK_TYPE        task (package) name                     required
    TASK_ID          request id = idempotency key            default: a new uuid
    DEVICE_IDS       comma-separated device ids
    DEVICE_SELECTOR  label selector, ``key=value,key=value``
    TASK_PARAMS      params as a JSON object                 default {}
    TASK_VERSION     package version, or TASK_CHANNEL        default channel stable
    TASK_PRIORITY    high | normal | low                     default normal

Exit codes (:class:`mayfly.exitcodes.ExitCode`):

    0  every device succeeded          4  no device succeeded (or canceled)
    1  internal error                  5  request rejected (task.rejected emitted)
    2  bad configuration               6  result could not be delivered
    3  partial: some devices failed
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from mayfly.errors import EventError
from mayfly.events import MayflyEvent, from_http, new_request

__all__ = ["JOBSINK_EVENT_PATH", "event_from_env", "process_start", "request_attributes"]

JOBSINK_EVENT_PATH = "/etc/jobsink-event/event"
JOBSINK_EVENT_FILE = "event"
"""The file, in the folder JobSink mounts, that holds the event."""


def event_from_env(env: Mapping[str, str]) -> MayflyEvent:
    """The event described by ``TASK_*`` variables or held in a CloudEvent file.

    Raises:
        EventError: naming the variable or field at fault.
    """
    event_path = env.get("K_EVENT_PATH") or (
        JOBSINK_EVENT_PATH
        if not env.get("TASK_TYPE") and Path(JOBSINK_EVENT_PATH).exists()
        else None
    )
    if event_path:
        path = Path(event_path)
        # Knative's JobSink appends K_EVENT_PATH naming the folder it mounts (after any
        # value of the Job's own, so that one never wins); the event is a file in it.
        if path.is_dir():
            path = path / JOBSINK_EVENT_FILE
        try:
            body = path.read_bytes()
        except OSError as exc:
            raise EventError("K_EVENT_PATH", f"cannot read {path}: {exc.strerror}") from exc
        return from_http({"content-type": "application/cloudevents+json"}, body)
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


def request_attributes(env: Mapping[str, str]) -> dict[str, object]:
    """What a rejection can say about a request that would not decode."""
    return {"tasktype": env.get("TASK_TYPE"), "id": env.get("TASK_ID")}


def process_start() -> datetime:
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
