"""``mayfly plan`` (and ``publish --dry-run``): what requests would do, run nowhere."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from mayfly.cli._common import PACKAGE_SETTINGS, dump, output_option, settings_options
from mayfly.cli._requests import build_requests, request_options
from mayfly.events import TaskRequest
from mayfly.settings import Settings

if TYPE_CHECKING:
    from mayfly.coordinator.outline import Outline

__all__ = ["plan", "print_plans"]

#: Device ids a table shows of each request, the first ones.
_SHOWN_DEVICES = 10


@click.command()
@request_options
@output_option
@settings_options(*PACKAGE_SETTINGS, "inventory", "shard_size", "max_processes")
def plan(
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
    output: str,
    settings: Settings,
) -> None:
    """Say what requests for TASK (or from --file) would do, without running them.

    Takes the flags `mayfly publish` takes and makes the checks its
    coordinator makes (the package version the ref resolves to and its
    digest, the params, the targets), then prints, per request: the devices
    it would run on and those it would skip (with why), the shards it would
    be cut into, how many devices run at once and in how many rounds, the
    package's limits, and after how many failures the rest would be skipped.
    Nothing is published and no device is touched. Exit 1 for a request its
    coordinator would reject, naming it.

    \b
    Examples:
      mayfly plan firmware-update -s site=lab-a -p version=2.0.0
      mayfly plan --file rollout.json -o json
    """
    requests = build_requests(
        task, devices, selectors, params, params_json, version, channel, priority, count, file
    )
    print_plans(settings, requests, output)


def print_plans(settings: Settings, requests: Sequence[TaskRequest], output: str) -> None:
    """Plan ``requests`` and print the plans (``table``, ``json`` or ``yaml``)."""
    from mayfly.app.publishing import plan_requests

    plans = plan_requests(settings, requests)
    if output != "table":
        dump([p.to_dict() for p in plans], output)
        return
    for number, found in enumerate(plans, 1):
        if number > 1:
            click.echo()
        request = found.request
        shown = ", ".join(found.devices[:_SHOWN_DEVICES])
        more = len(found.devices) - _SHOWN_DEVICES
        if more > 0:
            shown += f" and {more} more"
        shards = found.shards
        if len(shards) > 1:
            cut = f"{len(shards)} shards of {', '.join(str(n) for n in shards)} devices"
        else:
            cut = "whole, in one coordinator"
        rows = [
            ("request", f"{request.id} (not published)"),
            ("task", f"{request.task} ({request.priority.value})"),
            ("package", f"{found.version}  {found.digest}"),
            ("devices", f"{len(found.devices)}: {shown or '-'}"),
        ]
        if found.skipped:
            reasons = sorted(set(found.skipped.values()))
            rows.append(("skipped", f"{len(found.skipped)}: {'; '.join(reasons)}"))
        rows += [
            ("runs", cut),
            ("at once", f"{found.parallel} device(s), {found.waves} round(s) at least"),
            (
                "limits",
                f"{found.timeout_s:g} s in all, {found.device_timeout_s:g} s a device,"
                f" {found.retries} retries, {found.memory_mb} MB",
            ),
        ]
        if found.stop_after_failures is not None:
            rows.append(
                (
                    "failure budget",
                    f"the rest skipped past {found.stop_after_failures} failed device(s)"
                    f" of a coordinator's (max_failure_ratio {found.max_failure_ratio:g})",
                )
            )
        if found.abort is not None:
            abort = found.abort
            what = "did not succeed" if abort.outcome == "any" else abort.outcome.replace("_", " ")
            undo = ""
            if found.rollback is not None:
                at = found.rollback.version or "its stable channel"
                undo = f"; then {found.rollback.task} ({at}) runs on the devices it changed"
            rows.append(
                (
                    "abort",
                    f"stops once {abort.threshold_pct:g} % of the devices that ran {what},"
                    f" after {abort.min_devices} ran in a coordinator{undo}",
                )
            )
        rows += _pace_rows(found)
        rows += _schedule_rows(found)
        if request.deadline is not None:
            rows.append(("deadline", request.deadline.isoformat()))
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            click.echo(f"{name:<{width}}  {value}")
    click.echo("nothing was published; no device was touched", err=True)


def _pace_rows(found: Outline) -> list[tuple[str, str]]:
    """A paced rollout's waves, pace and how long its starts take."""
    if not found.pace:
        return []
    rows: list[tuple[str, str]] = []
    waves = found.rollout_waves
    if len(waves) > 1:
        sizes = ", ".join(str(n) for n in waves)
        rows.append(("waves", f"{len(waves)} of {sizes} devices, each once the one before ended"))
    rates = [step for step in found.pace if step.per_minute is not None]
    if rates:
        if len({step.per_minute for step in rates}) == 1:
            pace = f"{rates[0].per_minute:g} devices a minute"
        else:
            pace = ", then ".join(f"{s.devices} at {s.per_minute:g}/min" for s in rates)
        if len(found.shards) > 1:
            pace += f", shared by the {len(found.shards)} shards"
        rows.append(("pace", pace))
    if found.start_span_s is not None:
        rows.append(
            (
                "takes",
                f"{_duration(found.start_span_s)} to start every device at that pace"
                " (if they succeed), then the last one's run",
            )
        )
    return rows


def _schedule_rows(found: Outline) -> list[tuple[str, str]]:
    """A scheduled rollout's start, its next windows and what its end does."""
    rollout = found.request.rollout
    schedule = rollout.schedule if rollout else None
    rows: list[tuple[str, str]] = []
    if rollout is not None and rollout.continuous is not None:
        until = f" until {_moment(schedule.not_after)}" if schedule and schedule.not_after else ""
        rows.append(
            (
                "continuous",
                f"looks for new devices matching its selector every"
                f" {rollout.continuous.every_s} s{until or ', until canceled'}",
            )
        )
    if schedule is None:
        return rows
    if not found.windows:
        return [*rows, ("schedule", "ended: every device would be skipped")]
    rows.append(("starts", f"{_moment(found.windows[0][0])} (its schedule)"))
    if schedule.windows:
        shown = "; ".join(
            f"{_moment(opens)} to {_moment(closes) if closes else 'its end'}"
            for opens, closes in found.windows[:3]
        )
        rows.append(("windows", f"next {shown}"))
    if schedule.not_after is not None:
        then = "devices not started are skipped"
        if schedule.at_end == "cancel":
            then += ", running ones canceled"
        rows.append(("ends", f"{_moment(schedule.not_after)}: {then}"))
    return rows


def _moment(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
