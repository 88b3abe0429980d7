"""Job mode wired: ``python -m mayfly.coordinator`` runs one request and exits.

The request comes from the environment or a CloudEvent file
(:mod:`mayfly.coordinator.job` says which variables); settings, the result
sink and the coordinator come from :class:`~mayfly.settings.Settings`. The
exit status is the request's :class:`~mayfly.exitcodes.ExitCode`.

A result that the sink does not take (a full disk, a folder without write
permission, a sink that is down) is not lost: the devices already acted. Job
mode keeps it in a spool, ``$MAYFLY_HOME/spool/``, one file per outcome of
structured CloudEvents (one JSON object a line, as a file sink writes them),
fsynced, and says where on stderr; it still exits 6, since the sink has not
got it. Every job-mode run first delivers what the spool holds, oldest first,
to its sink, and a run of a request whose spooled result it just delivered
does not run it again.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from mayfly.app.installation import standalone_pipeline
from mayfly.app.wiring import build_coordinator, open_sink
from mayfly.coordinator import Coordinator, summarize
from mayfly.coordinator.job import event_from_env, process_start, request_attributes
from mayfly.coordinator.pipeline import Outcome, exit_code_for
from mayfly.coordinator.sinks import ResultSink
from mayfly.errors import EventError, MayflyError, SinkError
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    TaskRequest,
    from_http,
    split_completed,
    to_http,
)
from mayfly.exitcodes import ExitCode
from mayfly.settings import Settings

__all__ = ["run_job", "spool_dir"]

_STRUCTURED = {"content-type": "application/cloudevents+json"}


def _say(message: str) -> None:
    print(f"mayfly coordinator: {message}", file=sys.stderr)


def run_job(env: Mapping[str, str] | None = None) -> int:
    """Deliver what the spool holds, run one request, deliver the outcome, return
    the exit code."""
    env = os.environ if env is None else env
    received_at = process_start()
    try:
        settings = Settings.from_env(env)
        sink = open_sink(settings)
    except MayflyError as exc:
        _say(str(exc))
        return ExitCode.CONFIG
    try:
        return _run(env, settings, sink, received_at)
    finally:
        sink.close()


def _run(
    env: Mapping[str, str], settings: Settings, sink: ResultSink, received_at: datetime
) -> int:
    delivered = _deliver_spooled(spool_dir(settings), sink)
    try:
        event: MayflyEvent | EventError = event_from_env(env)
    except EventError as exc:
        event = exc  # the pipeline rejects it, with the reason
    if isinstance(event, TaskRequest) and event.id in delivered:
        outcome = delivered[event.id]
        _say(f"{event.id} already ran; its spooled outcome is now delivered: {summarize(outcome)}")
        return int(exit_code_for(outcome))
    try:
        coordinator = build_coordinator(settings, "job", require_packages=True)
    except MayflyError as exc:
        _say(str(exc))
        return ExitCode.CONFIG

    def on_start(running: Coordinator) -> None:
        # SIGTERM (Job deletion, pod eviction) cancels cleanly: the devices
        # still running end "canceled" and the result is still delivered.
        signal.signal(signal.SIGTERM, lambda *_: running.cancel())

    def read() -> MayflyEvent:
        if isinstance(event, EventError):
            raise event
        return event

    try:
        pipeline, state = standalone_pipeline(settings, coordinator, sink)
    except MayflyError as exc:
        _say(str(exc))
        return ExitCode.CONFIG
    try:
        handled = pipeline.handle(
            read, lambda: request_attributes(env), received_at=received_at, on_start=on_start
        )
    finally:
        if state is not None:
            state.close()
    if handled.defer_until is not None and isinstance(event, TaskRequest):
        return _defer(settings, event, handled.defer_until)
    if handled.error is not None:
        _say(handled.error)
        if handled.outcome is not None:
            _keep(spool_dir(settings), handled.outcome)
    elif handled.shards:
        _say(f"published as {len(handled.shards)} shards, each run by a coordinator of its own")
    elif handled.outcome is None:
        _say("the event is not a request; nothing to run")
    else:
        _say(summarize(handled.outcome))
    return int(handled.code)


def _defer(settings: Settings, request: TaskRequest, until: datetime) -> int:
    """Put a request its schedule holds on the deferred topic (``MAYFLY_DEFER_SINK``),
    marked with when it may start, and end OK: the waker moves it back to its
    lane then. Without that sink, exit DEFERRED (the Job runs it again)."""
    if not settings.defer_sink:
        _say(f"{request.id}: held by its schedule until {until.isoformat()}; no MAYFLY_DEFER_SINK")
        return int(ExitCode.DEFERRED)
    from mayfly.coordinator.sinks import HttpSink

    headers, body = to_http(request, "binary")
    headers["ce-notbefore"] = until.astimezone(UTC).isoformat()
    sink = HttpSink(settings.defer_sink)
    try:
        sink.post(sink.url, headers, body)
    except SinkError as exc:
        _say(f"{request.id}: held by its schedule, but not deferred: {exc}")
        return int(ExitCode.DEFERRED)
    finally:
        sink.close()
    _say(f"{request.id}: held by its schedule until {until.isoformat()}")
    return int(ExitCode.OK)


def spool_dir(settings: Settings) -> Path:
    """Where job mode keeps outcomes that its sink did not take."""
    return settings.home / "spool"


def _keep(folder: Path, outcome: Outcome) -> None:
    """Write the outcome to the spool, durably, and say where (or that it is lost)."""
    events = split_completed(outcome) if isinstance(outcome, TaskCompleted) else (outcome,)
    body = b"".join(to_http(event, "structured")[1] + b"\n" for event in events)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", outcome.request_id or outcome.id)[:80]
    path = folder / f"{time.time_ns():020d}-{name}.jsonl"
    tmp = folder / f".{path.name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.rename(path)  # a reader sees the whole file or none
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # and the name survives a power cut
        finally:
            os.close(dir_fd)
    except OSError as exc:
        _say(f"the outcome could not be kept in {folder} either ({exc.strerror or exc}): lost")
        return
    _say(f"outcome kept in {path}; the next job-mode run delivers it first")


def _deliver_spooled(folder: Path, sink: ResultSink) -> dict[str, Outcome]:
    """Emit each spooled file's events, oldest first; remove a file once its events
    are durable. Stops at the first the sink refuses (it is likely still down).

    Returns:
        The delivered outcomes by request id.
    """
    delivered: dict[str, Outcome] = {}
    try:
        paths = sorted(folder.glob("*.jsonl"))
    except OSError:
        return delivered
    for path in paths:
        try:
            events = [from_http(_STRUCTURED, line) for line in path.read_bytes().splitlines()]
        except (OSError, EventError) as exc:
            _say(f"spooled {path} is unreadable, left there: {exc}")
            continue
        try:
            for event in events:
                sink.emit(event)
        except SinkError as exc:
            _say(f"spooled outcomes stay in {folder}: {exc}")
            break
        path.unlink(missing_ok=True)  # another run may have delivered it too: at least once
        first = events[0] if events else None
        if isinstance(first, TaskCompleted | TaskRejected):
            shown = summarize(first) if len(events) == 1 else f"{len(events)} parts"
            _say(f"delivered the spooled outcome of {first.request_id} ({shown}) from {path}")
            if first.request_id:
                delivered[first.request_id] = first
    return delivered
