"""What ``mayfly publish`` and ``mayfly plan`` share: the request flags, and
the requests they make."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mayfly.cli._common import complete_devices, complete_tasks
from mayfly.errors import EventError
from mayfly.events import Priority, TaskRequest, new_request

__all__ = ["build_requests", "key_values", "merged_params", "request_options"]

F = TypeVar("F", bound=Callable[..., Any])


def key_values(values: tuple[str, ...], what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in values:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        found[key] = value
    return found


def param_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def merged_params(params_json: str | None, params: tuple[str, ...]) -> dict[str, Any]:
    """``--params JSON`` with each ``-p KEY=VALUE`` over it."""
    merged: dict[str, Any] = {}
    if params_json:
        try:
            merged = json.loads(params_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from exc
        if not isinstance(merged, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--params")
    return merged | {k: param_value(v) for k, v in key_values(params, "--param").items()}


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
    "fairness_key",
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


def request_options(fn: F) -> F:
    """The flags that say which requests to make (TASK or --file, devices,
    selector, params, version or channel, priority, count)."""
    for decorate in reversed(_OPTIONS):
        fn = decorate(fn)
    return fn


_OPTIONS: list[Callable[[Any], Any]] = [
    click.argument("task", required=False, shell_complete=complete_tasks),
    click.option(
        "-d",
        "--device",
        "devices",
        multiple=True,
        shell_complete=complete_devices,
        help="Target device id (repeatable).",
    ),
    click.option(
        "-s",
        "--selector",
        "selectors",
        multiple=True,
        help="Label selector KEY=VALUE (repeatable; all must match).",
    ),
    click.option(
        "-p",
        "--param",
        "params",
        multiple=True,
        help="Param KEY=VALUE; VALUE is JSON if it parses, else a string.",
    ),
    click.option("--params", "params_json", help="All params as one JSON object."),
    click.option("--version", "version", help="Package version to run."),
    click.option("--channel", help="Package channel to run (default: stable)."),
    click.option(
        "--priority",
        type=click.Choice([p.value for p in Priority]),
        default="normal",
        show_default=True,
    ),
    click.option(
        "--count",
        type=click.IntRange(1, 100_000),
        default=1,
        show_default=True,
        help="Publish this many identical requests (each its own id).",
    ),
    click.option(
        "--file",
        "file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Requests from a JSON file: an object or a list of objects with task, "
        "devices, selector, params, version, channel, priority, rollout "
        '({"max_parallel": N, "max_failure_ratio": R, "rate_per_minute": N, "ramp": {...}, '
        '"waves": [N, "P%"], "abort": {...}, "on_abort": {...}}) '
        "and deadline (ISO 8601 with a time zone); any other key is refused.",
    ),
]


def build_requests(
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
) -> list[TaskRequest]:
    """The requests the flags ask for.

    Raises:
        click.BadParameter, click.UsageError: a flag that makes no request.
    """
    specs: list[dict[str, Any]]
    if file is not None:
        specs = _from_file(file)
    elif task:
        merged = merged_params(params_json, params)
        specs = [
            {
                "task": task,
                "devices": list(devices),
                "selector": key_values(selectors, "--selector"),
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
                    fairness_key=spec.get("fairness_key"),
                )
            )
        except EventError as exc:
            raise click.BadParameter(str(exc)) from exc
    return requests_
