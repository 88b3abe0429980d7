"""``mayfly report``: per-task and per-device insights from the result archive."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import click

from mayfly.aggregator.insights import compute_insights, insights_to_json
from mayfly.aggregator.render import render_html, render_png, render_text
from mayfly.app.wiring import open_archive
from mayfly.cli._common import S3_SETTINGS, parse_duration, settings_options
from mayfly.settings import Settings

__all__ = ["parse_duration", "parse_moment", "report"]

_HINT = (
    "run `make demo` or `mayfly up` and publish some requests,"
    " or point --archive at another archive."
)


def parse_moment(text: str, now: datetime) -> datetime:
    """A duration back from ``now`` (``24h``) or an ISO 8601 time, naive meaning UTC.

    Raises:
        ValueError: when it is neither.
    """
    duration = parse_duration(text)
    if duration is not None:
        return now - duration
    moment = datetime.fromisoformat(text.strip())
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class _Moment(click.ParamType):  # type: ignore[type-arg]
    name = "TIME"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(str(value), datetime.now(UTC))
        except ValueError:
            self.fail(
                f"{value!r} is neither a duration (30m, 24h, 7d) nor a time"
                " (2025-03-14, 2025-03-14T09:00Z)",
                param,
                ctx,
            )


class _Bucket(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        duration = parse_duration(str(value))
        if duration is None:
            self.fail(f"{value!r} is not a duration such as 5m, 1h or 1d", param, ctx)
        return duration


def _fail(message: str, hint: str) -> NoReturn:
    click.secho(f"error: {message}", err=True, fg="red")
    click.echo(f"hint: {hint}", err=True)
    raise SystemExit(1)


@click.command()
@click.option(
    "--since",
    type=_Moment(),
    help="Only requests that ended since: a duration back from now (30m, 24h, 7d)"
    " or a UTC time (2025-03-14T09:00).",
)
@click.option("--until", type=_Moment(), help="Only requests that ended before this time.")
@click.option("--task", help="Only this task type.")
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Devices to list, worst first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write latency and success rate over time: a .png, or an .html page"
    " with the plot and the tables.",
)
@click.option("--bucket", type=_Bucket(), help="Width of the plot's time buckets (default: auto).")
@settings_options("home", "archive", *S3_SETTINGS)
def report(
    since: datetime | None,
    until: datetime | None,
    task: str | None,
    top: int,
    as_json: bool,
    plot: Path | None,
    bucket: timedelta | None,
    settings: Settings,
) -> None:
    """Show how task types and devices fared, from the archived results.

    Per task type: requests, devices run, success rates, p50/p95 request
    duration (publication to result) and p50 cold start. Per device:
    executions, success rate, failures by status, p50 duration and last
    error, the worst devices first.

    \b
      mayfly report                         # everything archived
      mayfly report --since 24h --task reboot --top 20
      mayfly report --since 7d --plot fleet.html
      mayfly report --json | jq '.devices[0]'
    """
    if plot is not None and plot.suffix.lower() not in (".png", ".html", ".htm"):
        raise click.BadParameter("the plot file must end in .png or .html", param_hint="--plot")
    source = open_archive(settings)
    insights = compute_insights(
        source.read(since=since, until=until, task=task), top=top, bucket=bucket
    )
    if insights.empty:
        filters = [
            text
            for text, given in (
                (f"--since {since:%Y-%m-%dT%H:%M}Z" if since else "", since),
                (f"--until {until:%Y-%m-%dT%H:%M}Z" if until else "", until),
                (f"--task {task}", task),
            )
            if given
        ]
        matching = f" matching {' '.join(filters)}" if filters else ""
        _fail(f"no archived results in {source.describe()}{matching}", _HINT)

    if plot is not None:
        try:
            png = render_png(insights)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "matplotlib").split(".")[0]
            _fail(f"--plot needs {missing}, which is not installed", "pip install 'mayfly[plot]'")
        try:
            if plot.suffix.lower() == ".png":
                plot.write_bytes(png)
            else:
                page = render_html(insights, png, archive=source.describe())
                plot.write_text(page, encoding="utf-8")
        except OSError as exc:
            _fail(
                f"cannot write {plot}: {exc.strerror}",
                "check that its folder exists and is writable.",
            )
        click.echo(f"wrote {plot}", err=as_json)
    if as_json:
        click.echo(json.dumps(insights_to_json(insights), indent=2))
    else:
        click.echo(render_text(insights, archive=source.describe()))
