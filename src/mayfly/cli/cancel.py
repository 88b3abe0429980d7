"""``mayfly cancel``: stop a published request, queued or running."""

from __future__ import annotations

import click

from mayfly.app.tracking import follow, read_book
from mayfly.app.wiring import check_event_log, open_event_log
from mayfly.cli._common import parse_duration, settings_options
from mayfly.events import DEFAULT_CANCEL_GRACE_S, MAX_CANCEL_GRACE_S, MAX_CANCEL_REASON
from mayfly.settings import Settings

__all__ = ["cancel"]


class _Grace(click.ParamType[float]):
    """A grace period: ``30s``, ``2m`` (as ``mayfly report`` reads durations)."""

    name = "duration"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        duration = parse_duration(str(value))
        if duration is None:
            self.fail(f"{value!r} is not a duration such as 30s, 2m or 1h", param, ctx)
        seconds = duration.total_seconds()
        if seconds > MAX_CANCEL_GRACE_S:
            self.fail(
                f"{value!r} is over the {MAX_CANCEL_GRACE_S:g} s a grace may last", param, ctx
            )
        return seconds


@click.command()
@click.argument("request_id")
@click.option(
    "--grace",
    "grace_s",
    type=_Grace(),
    default=f"{DEFAULT_CANCEL_GRACE_S:g}s",
    show_default=True,
    help="How long running devices get to end on their own (ctx.cancelled() is"
    " true) before their task processes are killed.",
)
@click.option("--now", is_flag=True, help="No grace: kill running devices' task processes at once.")
@click.option("--reason", default="", help=f"Why, in a few words (at most {MAX_CANCEL_REASON}).")
@click.option(
    "--wait", is_flag=True, help="Wait for the request's outcome, and exit as --wait does."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds --wait waits for the outcome.",
)
@click.option(
    "--no-validate",
    is_flag=True,
    help="Publish the cancel without looking the request up in the log first.",
)
@settings_options("home", "event_log", "topic_prefix")
def cancel(
    request_id: str,
    grace_s: float,
    now: bool,
    reason: str,
    wait: bool,
    timeout_s: float,
    no_validate: bool,
    settings: Settings,
) -> None:
    """Cancel a published request, whether it waits or runs.

    A request that has not started never will (on any runtime, including one
    that reads it later); its outcome is `canceled`. A running one skips the
    devices it has not started and retries nothing; the devices it runs see
    ctx.cancelled() and get --grace to end, then their task processes are
    killed and no device is reached any more. Devices that finished keep their
    result. Exit 1 when the log has no such request or it has already ended;
    with --wait: 4 once canceled (0 or 3 if its devices finished first).

    \b
    Examples:
      mayfly cancel 7d0c6a52-3f3e-4d55-9b0e-1d2f6e7a8b90
      mayfly cancel 7d0c6a52-3f3e-4d55-9b0e-1d2f6e7a8b90 --grace 2m --wait
    """
    from mayfly.coordinator.pipeline import exit_code_for, summarize
    from mayfly.errors import EventError
    from mayfly.events import TaskCancel, to_kafka_record

    if len(reason) > MAX_CANCEL_REASON:
        raise click.BadParameter(f"at most {MAX_CANCEL_REASON} characters", param_hint="--reason")
    try:
        event = TaskCancel.of(request_id, 0.0 if now else grace_s, reason)
    except EventError as exc:
        raise click.BadParameter(str(exc), param_hint="REQUEST_ID") from exc
    check_event_log(settings)
    log = open_event_log(settings)
    try:
        where = log.describe()
        asked_before = False
        if not no_validate:
            view = read_book(log, settings.topics, only=[request_id]).get(request_id)
            if view is None:
                click.secho(f"error: no request {request_id!r} in {where}", err=True, fg="red")
                click.echo("hint: `mayfly list` shows the requests there.", err=True)
                raise SystemExit(1)
            if view.outcome is not None:
                click.secho(
                    f"error: {request_id} already ended ({view.state.value}): nothing to cancel",
                    err=True,
                    fg="red",
                )
                raise SystemExit(1)
            asked_before = view.cancel is not None
        if asked_before:
            click.echo(f"{request_id}: a cancel was published already; it stands")
        else:
            log.append(settings.topics.control, *to_kafka_record(event))
            grace = "at once" if event.grace_s == 0 else f"within {event.grace_s:g} s"
            click.echo(f"{request_id}: cancel published (running devices stop {grace})")
        if not wait:
            return
        found = follow(log, settings.topics, request_id, lambda _view: None, timeout_s)
    finally:
        log.close()
    if found is None or found.outcome is None:
        click.secho(f"no outcome within {timeout_s:g} s", err=True, fg="red")
        raise SystemExit(1)
    click.echo(f"{request_id} {summarize(found.outcome)}")
    raise SystemExit(int(exit_code_for(found.outcome)))
