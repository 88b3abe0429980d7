"""``mayfly up`` and ``mayfly publish``: the local runtime and its requests."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mayfly.app.wiring import check_event_log, open_event_log
from mayfly.cli._common import (
    PACKAGE_SETTINGS,
    complete_devices,
    complete_tasks,
    settings_options,
)
from mayfly.coordinator import summarize
from mayfly.errors import EventError, MayflyError
from mayfly.eventlog import EventLog
from mayfly.eventlog.publisher import publish_request
from mayfly.events import (
    MayflyEvent,
    Priority,
    TaskCompleted,
    TaskRejected,
    new_request,
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
    "coordinator_mode",
    "archive",
    "otlp_endpoint",
    "otlp_metrics_endpoint",
    "trace_file",
)

_DISPATCH_LOG = logging.getLogger("mayfly.runtime.dispatch")


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        found[key] = value
    return found


def _param_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


#: What a request in a --file may say: new_request's arguments, by the same names.
_FILE_KEYS = (
    "task",
    "devices",
    "selector",
    "params",
    "version",
    "channel",
    "priority",
    "rollout",
    "deadline",
)


def _from_file(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--file") from exc
    items = doc if isinstance(doc, list) else [doc]
    if not all(isinstance(i, dict) for i in items):
        raise click.BadParameter("expected a JSON object or a list of objects", param_hint="--file")
    for index, item in enumerate(items):
        # A misspelt key ("deadine") would otherwise be dropped and the request run without it.
        unknown = sorted(set(item) - set(_FILE_KEYS))
        if unknown:
            where = f"request {index}" if isinstance(doc, list) else "the request"
            raise click.BadParameter(
                f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(_FILE_KEYS)})",
                param_hint="--file",
            )
    return items


@click.command()
@click.argument("task", required=False, shell_complete=complete_tasks)
@click.option(
    "-d",
    "--device",
    "devices",
    multiple=True,
    shell_complete=complete_devices,
    help="Target device id (repeatable).",
)
@click.option(
    "-s",
    "--selector",
    "selectors",
    multiple=True,
    help="Label selector KEY=VALUE (repeatable; all must match).",
)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    help="Param KEY=VALUE; VALUE is JSON if it parses, else a string.",
)
@click.option("--params", "params_json", help="All params as one JSON object.")
@click.option("--version", "version", help="Package version to run.")
@click.option("--channel", help="Package channel to run (default: stable).")
@click.option(
    "--priority",
    type=click.Choice([p.value for p in Priority]),
    default="normal",
    show_default=True,
)
@click.option(
    "--count",
    type=click.IntRange(1, 100_000),
    default=1,
    show_default=True,
    help="Publish this many identical requests (each its own id).",
)
@click.option(
    "--file",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Requests from a JSON file: an object or a list of objects with task, "
    "devices, selector, params, version, channel, priority, rollout "
    '({"max_parallel": N, "max_failure_ratio": R}) and deadline (ISO 8601 with a '
    "time zone); any other key is refused.",
)
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
    specs: list[dict[str, Any]]
    if file is not None:
        specs = _from_file(file)
    elif task:
        merged: dict[str, Any] = {}
        if params_json:
            try:
                merged = json.loads(params_json)
            except ValueError as exc:
                raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from exc
            if not isinstance(merged, dict):
                raise click.BadParameter("must be a JSON object", param_hint="--params")
        merged |= {k: _param_value(v) for k, v in _pairs(params, "--param").items()}
        specs = [
            {
                "task": task,
                "devices": list(devices),
                "selector": _pairs(selectors, "--selector"),
                "params": merged,
                "version": version,
                "channel": channel,
                "priority": priority,
            }
        ] * count
    else:
        raise click.UsageError("give a TASK or --file")
    requests_ = []
    for spec in specs:
        try:
            requests_.append(
                new_request(
                    spec.get("task", ""),
                    devices=spec.get("devices") or (),
                    selector=spec.get("selector") or None,
                    params=spec.get("params") or {},
                    version=spec.get("version"),
                    channel=spec.get("channel"),
                    priority=spec.get("priority") or "normal",
                    rollout=spec.get("rollout"),
                    # An ISO 8601 string: the request's validation parses and checks it.
                    deadline=spec.get("deadline"),
                )
            )
        except EventError as exc:
            raise click.BadParameter(str(exc)) from exc
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
