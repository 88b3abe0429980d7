"""``mayfly up`` and ``mayfly publish``: the local runtime and its requests."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import click

from mayfly.app.wiring import open_event_log
from mayfly.cli._common import PACKAGE_SETTINGS, settings_options
from mayfly.coordinator import summarize
from mayfly.errors import EventError
from mayfly.eventlog.publisher import publish_request
from mayfly.events import (
    MayflyEvent,
    Priority,
    TaskCompleted,
    TaskRejected,
    new_request,
)
from mayfly.settings import Settings

__all__ = ["publish", "up"]

#: What `mayfly up` runs on: the event log, packages, devices, limits, telemetry.
_UP_SETTINGS = (
    *PACKAGE_SETTINGS,
    "event_log",
    "topic_prefix",
    "inventory",
    "max_processes",
    "max_coordinators",
    "per_task_cap",
    "archive",
    "otlp_endpoint",
    "otlp_metrics_endpoint",
    "trace_file",
)


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


def _from_file(path: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--file") from exc
    items = doc if isinstance(doc, list) else [doc]
    if not all(isinstance(i, dict) for i in items):
        raise click.BadParameter("expected a JSON object or a list of objects", param_hint="--file")
    return items


@click.command()
@click.argument("task", required=False)
@click.option("-d", "--device", "devices", multiple=True, help="Target device id (repeatable).")
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
    "devices, selector, params, version, channel, priority.",
)
@settings_options("home", "event_log", "topic_prefix", "otlp_endpoint")
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
    settings: Settings,
) -> None:
    """Publish task requests for TASK (or from --file) to the event log.

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
                )
            )
        except EventError as exc:
            raise click.BadParameter(str(exc)) from exc
    telemetry = None
    if settings.otlp_endpoint:
        from mayfly.telemetry import configure_telemetry

        telemetry = configure_telemetry("mayfly-publisher", otlp_endpoint=settings.otlp_endpoint)
    log = open_event_log(settings)
    try:
        for request in requests_:
            tracer = telemetry.tracer("mayfly.publisher") if telemetry else None
            sent = publish_request(log, request, tracer, topics=settings.topics)
            topic = settings.topics.lane(request.priority)
            trace = f" trace {sent.traceparent.split('-')[1]}" if sent.traceparent else ""
            click.echo(
                f"published {request.id} {request.task} ({request.priority}) -> {topic}{trace}"
            )
    finally:
        log.close()
        if telemetry is not None:
            telemetry.flush()
            telemetry.shutdown()


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
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # A configuration error is said here, in one line, before anything is forked.
    check_wiring(settings)
    runtime = Runtime(settings)
    # Fork the warm parent before telemetry starts its export threads, so no
    # coordinator carries a copy of them.
    runtime.spawner.start()
    aggregation = build_aggregator(settings, on_events=_print_results)
    runtime.ingest = aggregation.ingest
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    runtime.start()
    click.echo(
        f"mayfly up: event log {runtime.log.describe()}, "
        f"{settings.max_coordinators} coordinators at most; {aggregation.describe()}; "
        "Ctrl-C stops"
    )
    try:
        runtime.run()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.close()
        aggregation.close()
