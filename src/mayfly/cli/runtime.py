"""``mayfly up`` and ``mayfly publish``: the local runtime and its requests."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import click

from mayfly.app.wiring import check_event_log, open_event_log
from mayfly.cli._common import PACKAGE_SETTINGS, settings_options
from mayfly.cli._requests import build_requests, request_options
from mayfly.coordinator import summarize
from mayfly.errors import MayflyError
from mayfly.eventlog import EventLog
from mayfly.eventlog.publisher import publish_request
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
)
from mayfly.procs import LOG_FORMAT
from mayfly.settings import Settings

__all__ = ["publish", "up"]

#: What `mayfly up` runs on: the event log, packages, devices, limits, telemetry.
_UP_SETTINGS = (
    *PACKAGE_SETTINGS,
    "event_log",
    "topic_prefix",
    "inventory",
    "max_processes",
    "shard_size",
    "max_coordinators",
    "per_task_cap",
    "task_weights",
    "coordinator_mode",
    "archive",
    "otlp_endpoint",
    "otlp_metrics_endpoint",
    "trace_file",
)

_DISPATCH_LOG = logging.getLogger("mayfly.runtime.dispatch")


@click.command()
@request_options
@click.option(
    "--wait",
    is_flag=True,
    help="Wait for every request's outcome, print it, and exit as job mode does: 0 all "
    "succeeded, 3 partial, 4 failed, 5 rejected (the worst of them); 1 if the timeout passes.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    help="Seconds --wait waits for the outcomes.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Publish nothing: say what each request would do, as `mayfly plan` does.",
)
@click.option(
    "--no-validate",
    "no_validate",
    is_flag=True,
    help="Publish without checking each request against the store and the inventory "
    "first (for a publisher that cannot see them; the runtime still rejects what fails).",
)
@settings_options(*PACKAGE_SETTINGS, "inventory", "event_log", "topic_prefix", "otlp_endpoint")
def publish(
    task: str | None,
    devices: tuple[str, ...],
    selectors: tuple[str, ...],
    params: tuple[str, ...],
    params_json: str | None,
    version: str | None,
    channel: str | None,
    priority: str,
    count: int,
    file: Path | None,
    wait: bool,
    timeout_s: float,
    dry_run: bool,
    no_validate: bool,
    settings: Settings,
) -> None:
    """Publish task requests for TASK (or from --file) to the event log.

    Each request is first checked as its coordinator will check it, against
    the same store and inventory: the task and its version or channel, the
    params against the package's schema, the devices and the selector. A
    request that fails is named with the reason, and nothing is published
    (exit 1); --no-validate skips the check.

    With an OTLP endpoint, each request's trace starts with a publish span
    there and its trace id is printed.

    \b
    Examples:
      mayfly publish reboot -d sim-0001
      mayfly publish firmware-update -s site=lab-a -p version=2.0.0 --priority high
      mayfly publish config-push -s ring=canary --params '{"config": {"log_level": "debug"}}'
    """
    requests_ = build_requests(
        task, devices, selectors, params, params_json, version, channel, priority, count, file
    )
    if dry_run:
        from mayfly.cli.plan import print_plans

        print_plans(settings, requests_, "table")
        return
    notes: list[str | None] = []
    if not no_validate:
        from mayfly.app.publishing import lanes_note, preflight, preflight_log

        notes.append(preflight_log(settings))  # before the log is opened: that makes it
    # The log first: one that cannot be used is a setting's fault (exit 2),
    # whatever the requests are.
    check_event_log(settings)
    log = open_event_log(settings)
    telemetry = None
    try:
        if not no_validate:
            preflight(settings, requests_)
            notes.append(lanes_note(log, settings))
        for note in filter(None, notes):
            click.echo(note, err=True)
        if settings.otlp_endpoint:
            from mayfly.telemetry import configure_telemetry

            telemetry = configure_telemetry(
                "mayfly-publisher", otlp_endpoint=settings.otlp_endpoint
            )
        for request in requests_:
            tracer = telemetry.tracer("mayfly.publisher") if telemetry else None
            sent = publish_request(log, request, tracer, topics=settings.topics)
            topic = settings.topics.lane(request.priority)
            trace = f" trace {sent.traceparent.split('-')[1]}" if sent.traceparent else ""
            click.echo(
                f"published {request.id} {request.task} ({request.priority}) -> {topic}{trace}"
            )
        if wait:
            _wait(log, settings, [r.id for r in requests_], timeout_s)
    finally:
        log.close()
        if telemetry is not None:
            telemetry.flush()
            telemetry.shutdown()


def _wait(log: EventLog, settings: Settings, ids: list[str], timeout_s: float) -> None:
    from mayfly.app.waiting import wait_for_outcomes

    waited = wait_for_outcomes(log, settings.topics, ids, timeout_s, on_outcome=_print_result)
    if waited.missing:
        shown = ", ".join(waited.missing[:5]) + (" ..." if len(waited.missing) > 5 else "")
        click.secho(
            f"no outcome within {timeout_s:g} s for {len(waited.missing)} of {len(ids)} "
            f"request(s): {shown}",
            err=True,
            fg="red",
        )
        raise SystemExit(1)
    raise SystemExit(int(waited.exit_code))


def _log_dispatch(kind: str, info: dict[str, object]) -> None:
    """``up -v``: one line per dispatch decision."""
    rid = info.get("request_id")
    if kind == "started":
        task, priority = info.get("task"), info.get("priority")
        what = f"{task} ({priority}) in coordinator {info.get('coordinator')}"
        _DISPATCH_LOG.info("started %s: %s", rid, what)
    elif kind == "finished":
        _DISPATCH_LOG.info("finished %s: exit code %s", rid, info.get("code"))
    elif kind == "skipped":
        _DISPATCH_LOG.info("skipped %s: it already has a result (a redelivery)", rid)
    else:
        _DISPATCH_LOG.info("%s %s", kind.replace("_", "-"), rid)


def _print_results(events: list[MayflyEvent]) -> None:
    for event in events:
        _print_result(event)


def _print_result(event: MayflyEvent) -> None:
    if isinstance(event, TaskCompleted | TaskRejected):
        click.echo(f"{event.request_id} {summarize(event)}")


@click.command()
@settings_options(*_UP_SETTINGS)
@click.option("-v", "--verbose", is_flag=True, help="Log every dispatch decision.")
def up(settings: Settings, verbose: bool) -> None:
    """Run the local runtime until Ctrl-C: dispatcher, coordinators, aggregator.

    Requests published with `mayfly publish` (or any producer writing to the
    event log) are served by priority lane; each one gets its own coordinator
    process, forked from a warm parent, which exits when the request is done.
    """
    from mayfly.app.local import Runtime, check_wiring
    from mayfly.app.wiring import build_aggregator

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=LOG_FORMAT,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is every join and fetch
    # A configuration error is said here, in one line, before anything is forked.
    check_wiring(settings)
    runtime = Runtime(settings, on_dispatch=_log_dispatch if verbose else None)
    runtime.state.check()
    runtime.state.close()  # no connection is carried across the warm parent's fork
    # Fork the warm parent before telemetry starts its export threads, so no
    # coordinator carries a copy of them.
    runtime.spawner.start()
    died = _RuntimeThreads(runtime.stop)
    aggregation = None
    try:
        aggregation = build_aggregator(settings, on_events=_print_results)
        runtime.ingest = aggregation.ingest
        signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
        runtime.start()
        click.echo(
            f"mayfly up: event log {runtime.log.describe()}, "
            f"{settings.max_coordinators} coordinators at most; {aggregation.describe()}; "
            "Ctrl-C stops"
        )
        with contextlib.suppress(KeyboardInterrupt):
            runtime.run()
        died.reraise()
    finally:
        # Whatever stopped it (Ctrl-C, SIGTERM, an error while starting or serving),
        # the warm parent and the threads go too: nothing is left running.
        runtime.close()
        died.uninstall()  # after the aggregator's thread was joined
        if aggregation is not None:
            aggregation.close()


class _RuntimeThreads:
    """Stops the runtime when one of its threads (the aggregator's) dies, and
    hands the reason to the command: a runtime that lost its aggregator would
    otherwise go on serving without reading a single result."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._previous = threading.excepthook
        self._error: BaseException | None = None
        self._thread = ""
        threading.excepthook = self._died

    def _died(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else ""
        if not name.startswith("mayfly-"):
            self._previous(args)
            return
        if not isinstance(args.exc_value, MayflyError):
            self._previous(args)  # a bug: its traceback is what to report
        if self._error is None:
            self._error, self._thread = args.exc_value, name
        self._stop()

    def reraise(self) -> None:
        """Raise what killed a thread: a Mayfly error as itself (one line)."""
        if isinstance(self._error, MayflyError):
            raise self._error
        if self._error is not None:
            raise click.ClickException(
                f"thread {self._thread} died ({self._error!r}, traceback above); stopped"
            )

    def uninstall(self) -> None:
        threading.excepthook = self._previous
