"""``mayfly up`` and ``mayfly publish``: the local runtime and its requests."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mayfly.backends import open_event_log
from mayfly.cli._common import settings_from
from mayfly.coordinator.entry import summarize
from mayfly.errors import EventError
from mayfly.events import (
    MayflyEvent,
    Priority,
    TaskCompleted,
    TaskRejected,
    new_request,
)
from mayfly.runtime.publisher import publish_request
from mayfly.settings import ENV_EVENT_LOG, ENV_MAX_COORDINATORS, ENV_PER_TASK_CAP, Settings

__all__ = ["publish", "up"]

event_log_option = click.option(
    "--event-log",
    help="Event log: kafka://HOST:PORT, or a SQLite file (default $MAYFLY_HOME/events.db). "
    f"Env: {ENV_EVENT_LOG}.",
)
home_option = click.option(
    "--home", type=click.Path(path_type=str), help="Mayfly's folder. Env: MAYFLY_HOME."
)


def _settings(home: str | None, event_log: str | None, **changes: Any) -> Settings:
    return settings_from(home=home).replace(event_log=event_log, **changes)


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
@event_log_option
@home_option
@click.option(
    "--otlp-endpoint",
    envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
    help="OTLP/HTTP endpoint: start each request's trace with a publish span there and "
    "print its trace id. Env: OTEL_EXPORTER_OTLP_ENDPOINT.",
)
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
    event_log: str | None,
    home: str | None,
    otlp_endpoint: str | None,
) -> None:
    """Publish task requests for TASK (or from --file) to the event log.

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
    settings = _settings(home, event_log)
    telemetry = None
    if otlp_endpoint:
        from mayfly.telemetry import configure_telemetry

        telemetry = configure_telemetry("mayfly-publisher", otlp_endpoint=otlp_endpoint)
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
@event_log_option
@home_option
@click.option(
    "--max-coordinators",
    type=click.IntRange(1, 256),
    help=f"Coordinator processes at once. Env: {ENV_MAX_COORDINATORS}.",
)
@click.option(
    "--per-task-cap",
    type=click.IntRange(1, 256),
    help=f"Coordinators of one task type at once. Env: {ENV_PER_TASK_CAP}.",
)
@click.option("--store", help="Package store: a folder or s3://BUCKET. Env: MAYFLY_STORE.")
@click.option("--s3-endpoint", help="S3 endpoint URL for s3:// stores. Env: MAYFLY_S3_ENDPOINT.")
@click.option(
    "--otlp-endpoint",
    help="OTLP/HTTP endpoint for traces, e.g. http://127.0.0.1:4318 (Jaeger). "
    "Env: OTEL_EXPORTER_OTLP_ENDPOINT. Unset: an OTLP-JSON file under MAYFLY_HOME.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every dispatch decision.")
def up(
    event_log: str | None,
    home: str | None,
    max_coordinators: int | None,
    per_task_cap: int | None,
    store: str | None,
    s3_endpoint: str | None,
    otlp_endpoint: str | None,
    verbose: bool,
) -> None:
    """Run the local runtime until Ctrl-C: dispatcher, coordinators, aggregator.

    Requests published with `mayfly publish` (or any producer writing to the
    event log) are served by priority lane; each one gets its own coordinator
    process, forked from a warm parent, which exits when the request is done.
    """
    from mayfly.runtime.app import Runtime

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    settings = _settings(
        home,
        event_log,
        max_coordinators=max_coordinators,
        per_task_cap=per_task_cap,
        store=store,
        s3_endpoint=s3_endpoint,
    )

    def on_results(events: list[MayflyEvent]) -> None:
        aggregate(events)
        _print_results(events)

    runtime = Runtime(settings, on_results=on_results)
    # Fork the warm parent before telemetry starts its export threads, so no
    # coordinator carries a copy of them.
    runtime.spawner.start()
    aggregate, telemetry, where = _aggregation(settings, otlp_endpoint)
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    runtime.start()
    click.echo(
        f"mayfly up: event log {runtime.log.describe()}, "
        f"{settings.max_coordinators} coordinators at most; {where}; Ctrl-C stops"
    )
    try:
        runtime.run()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.close()
        telemetry.flush()
        telemetry.shutdown()


def _aggregation(
    settings: Settings, otlp_endpoint: str | None = None
) -> tuple[Callable[[list[MayflyEvent]], None], Any, str]:
    """The aggregator as the runtime's results consumer: traces, metrics, archive."""
    from mayfly.aggregator import Aggregator
    from mayfly.aggregator.archive import archive_location_from_env, open_archive
    from mayfly.telemetry import configure_telemetry, telemetry_options_from_env

    options = telemetry_options_from_env(settings.home)
    endpoint = otlp_endpoint or options.otlp_endpoint
    telemetry = configure_telemetry(
        "mayfly-aggregator",
        otlp_endpoint=endpoint,
        trace_file=None if endpoint else options.trace_file,
    )
    archive = open_archive(archive_location_from_env(settings.home), settings)
    aggregator = Aggregator(
        telemetry.tracer(),
        telemetry.meter(),
        archive,
        messaging_system=settings.event_log.split(":", 1)[0]
        if "://" in settings.event_log
        else "sqlite",
        destination=settings.topics.results,
    )

    def aggregate(events: list[MayflyEvent]) -> None:
        aggregator.handle_many([e for e in events if isinstance(e, TaskCompleted | TaskRejected)])

    where = f"traces to {telemetry.destination}, archive {archive.describe()}"
    return aggregate, telemetry, where
