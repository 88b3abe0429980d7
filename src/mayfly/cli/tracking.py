"""``mayfly get`` and ``mayfly list``: published requests, as the log tells them."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta

import click

from mayfly.app.tracking import follow, read_book
from mayfly.app.wiring import check_event_log, open_event_log
from mayfly.cli._common import dump, output_option, settings_options
from mayfly.events import DeviceResult, DeviceStatus, LogLine, TaskCompleted, TaskRejected
from mayfly.settings import Settings
from mayfly.tracking import RequestState, RequestView, trace_url

__all__ = ["get", "list_requests", "watch"]

#: Cells of a table are cut here; -o json and -o yaml print everything.
_CELL = 100
_BAR = 30
_SINCE = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# Problems first: the devices an operator looks at are at the top.
_ORDER = {
    DeviceStatus.FAILED: 0,
    DeviceStatus.TIMED_OUT: 1,
    DeviceStatus.CANCELED: 2,
    DeviceStatus.RUNNING: 3,
    DeviceStatus.QUEUED: 4,
    DeviceStatus.SKIPPED: 5,
    DeviceStatus.SUCCEEDED: 6,
}


@click.command()
@click.argument("request_id")
@output_option
@click.option(
    "--max-devices",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Device rows in the table at most, problems first (0: all).",
)
@click.option(
    "--logs", is_flag=True, help="Also print the package's lines (ctx.log, ctx.progress)."
)
@settings_options("home", "event_log", "topic_prefix", "jaeger_url")
def get(request_id: str, output: str, max_devices: int, logs: bool, settings: Settings) -> None:
    """Show one request: its state, package, trace and every device's result.

    REQUEST_ID is the id `mayfly publish` printed. The request and its outcome
    are read from the event log, so this works after restarts and whichever
    runtime ran it. Exit 1 when the log has no such request.

    \b
    Examples:
      mayfly get 7d0c6a52-3f3e-4d55-9b0e-1d2f6e7a8b90
      mayfly get 7d0c6a52-3f3e-4d55-9b0e-1d2f6e7a8b90 -o json
    """
    check_event_log(settings)
    log = open_event_log(settings)
    try:
        view = read_book(log, settings.topics, only=[request_id]).get(request_id)
        where = log.describe()
    finally:
        log.close()
    if view is None:
        click.secho(f"error: no request {request_id!r} in {where}", err=True, fg="red")
        click.echo("hint: `mayfly list` shows the requests there.", err=True)
        raise SystemExit(1)
    if output != "table":
        dump(view.to_dict(jaeger_url=settings.jaeger_url), output)
        return
    _print_view(view, settings.jaeger_url, max_devices, logs)


@click.command()
@click.argument("request_id")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds to follow at most (then exit 1).",
)
@settings_options("home", "event_log", "topic_prefix")
def watch(request_id: str, timeout_s: float, settings: Settings) -> None:
    """Follow one request live, with a progress bar, until its outcome.

    Shows how many devices are done, and how many are in each status, as its
    coordinators report (every half second while it runs). Exits as job mode
    and `publish --wait` do: 0 when every device succeeded, 3 partial, 4
    failed, 5 rejected; 1 when --timeout passes or the log has no such request.
    """
    from mayfly.coordinator.pipeline import exit_code_for, summarize

    check_event_log(settings)
    log = open_event_log(settings)
    screen = _Screen(sys.stdout.isatty())
    try:
        view = follow(log, settings.topics, request_id, screen.show, timeout_s)
        where = log.describe()
    except KeyboardInterrupt:
        screen.end()
        raise SystemExit(130) from None
    finally:
        log.close()
    screen.end()
    if view is None:
        click.secho(f"error: no request {request_id!r} in {where}", err=True, fg="red")
        raise SystemExit(1)
    if view.outcome is None:
        click.secho(f"no outcome within {timeout_s:g} s: {view.state.value}", err=True, fg="red")
        raise SystemExit(1)
    click.echo(f"{view.id} {summarize(view.outcome)}")
    raise SystemExit(int(exit_code_for(view.outcome)))


class _Screen:
    """One line of progress: redrawn in place on a terminal, else printed as it changes."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.last = ""
        self.lines_shown = 0

    def show(self, view: RequestView) -> None:
        new = view.lines_seen - self.lines_shown
        if new > 0:
            self.lines_shown = view.lines_seen
            if self.tty and self.last:
                click.echo("\r" + " " * len(self.last) + "\r", nl=False)
                self.last = ""  # drawn again below the lines
            for kept in list(view.lines)[-new:]:
                click.echo(_line(kept.device_id, kept))
        line = _progress_line(view)
        if line == self.last:
            return
        if self.tty:
            click.echo("\r" + line.ljust(len(self.last)), nl=False)
        else:
            click.echo(line)
        self.last = line

    def end(self) -> None:
        if self.tty and self.last:
            click.echo()


def _progress_line(view: RequestView) -> str:
    if view.outcome is not None:
        counts = view.device_counts
    elif view.state is RequestState.RUNNING:
        counts = view.running_counts
    else:
        held = "".join(f"; {value}" for _, value in _schedule_rows(view))
        return f"{view.id} pending: published {_when(view.published_at)}, not running yet{held}"
    total = view.device_total or sum(counts.values())
    ongoing = (DeviceStatus.QUEUED.value, DeviceStatus.RUNNING.value)
    done = sum(n for s, n in counts.items() if s not in ongoing)
    filled = round(_BAR * done / total) if total else _BAR
    bar = "█" * filled + "░" * (_BAR - filled)
    shown = "  ".join(f"{s} {n}" for s, n in sorted(counts.items()) if n)
    return f"{bar} {done}/{total} done  {shown}"


@click.command("list")
@click.option("--task", help="Only requests of this task type.")
@click.option(
    "--status",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in RequestState]),
    help="Only requests in this state (repeatable).",
)
@click.option(
    "--since",
    help="Only requests published since then: 30s, 15m, 2h, 7d or an ISO 8601 time.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Requests shown at most, newest first (0: all).",
)
@output_option
@settings_options("home", "event_log", "topic_prefix")
def list_requests(
    task: str | None,
    states: tuple[str, ...],
    since: str | None,
    limit: int,
    output: str,
    settings: Settings,
) -> None:
    """List published requests, newest first, with their state.

    pending: published, no outcome yet. succeeded, partial, failed, canceled:
    its devices' outcome. rejected: it could not run (`mayfly get ID` says why).

    \b
    Examples:
      mayfly list
      mayfly list --task firmware-update --status failed --status partial --since 1d
    """
    since_at = _since(since) if since else None
    check_event_log(settings)
    log = open_event_log(settings)
    try:
        book = read_book(log, settings.topics, keep_devices=False)
    finally:
        log.close()
    found = book.views(task=task, states=[RequestState(s) for s in states], since=since_at)
    shown = found[:limit] if limit else found
    if output != "table":
        dump([v.to_dict() for v in shown], output)
    elif not shown:
        click.echo("no requests" + (" match" if found or len(book) else " in the log"))
    else:
        _print_list(shown)
    if len(shown) < len(found):
        click.echo(f"{len(found) - len(shown)} more: --limit 0 shows all", err=True)


def _since(raw: str) -> datetime:
    now = datetime.now(UTC)
    match = _SINCE.fullmatch(raw.strip())
    if match:
        try:
            return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            return datetime.min.replace(tzinfo=UTC)  # longer ago than anything
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise click.BadParameter(
            "expected a duration (30s, 15m, 2h, 7d) or an ISO 8601 time", param_hint="--since"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _rollout_rows(view: RequestView) -> list[tuple[str, str]]:
    """A paced rollout's pace, and while it runs whole, the wave it is in."""
    rollout = view.request.rollout if view.request is not None else None
    if rollout is None or not rollout.paced:
        return []
    from mayfly.coordinator.pacing import Pace

    words = []
    if rollout.rate_per_minute is not None:
        words.append(f"{rollout.rate_per_minute:g} devices a minute")
    if rollout.ramp is not None:
        ramp = rollout.ramp
        top = f", up to {ramp.max_per_minute:g}" if ramp.max_per_minute is not None else ""
        words.append(
            f"from {ramp.base_per_minute:g}/min, x{ramp.increment_factor:g}"
            f" every {ramp.increase_after} successes{top}"
        )
    counts = view.running_counts
    total = sum(counts.values())
    if total and view.outcome is None and not view.shards:
        ended = total - counts.get("queued", 0) - counts.get("running", 0)
        pace = Pace(rollout, total, now=0.0)
        if rollout.ramp is not None:
            now = pace.per_second(counts.get("succeeded", 0)) or 0.0
            words.append(f"now {now * 60:g}/min")
        if len(pace.bounds) > 1:
            words.append(f"wave {pace.wave_of(ended)} of {len(pace.bounds)}")
        words.append(f"{ended} of {total} devices ended")
    elif rollout.waves:
        words.append(f"waves {', '.join(str(w) for w in rollout.waves)}")
    return [("rollout", "; ".join(words))]


def _schedule_rows(view: RequestView) -> list[tuple[str, str]]:
    """A scheduled request's next window, while it has not ended."""
    rollout = view.request.rollout if view.request is not None else None
    if rollout is None or rollout.schedule is None or view.outcome is not None:
        return []
    from mayfly.coordinator.schedule import open_spans

    now = datetime.now(UTC)
    spans = open_spans(rollout.schedule, now, limit=1)
    if not spans:
        return [("schedule", "ended: its devices not started are skipped")]
    opens, closes = spans[0]
    until = f" until {_when(closes)}" if closes is not None else ""
    if opens <= now:
        return [("schedule", f"open{until}")]
    return [("schedule", f"closed: its devices start from {_when(opens)}{until}")]


def _print_view(view: RequestView, jaeger_url: str | None, max_devices: int, logs: bool) -> None:
    outcome = view.outcome
    rows: list[tuple[str, str]] = [
        ("request", view.id),
        ("task", f"{view.task or '?'} ({view.priority or '?'})"),
        ("state", _state_line(view)),
        ("published", _when(view.published_at)),
    ]
    if view.running_since is not None:
        rows.append(("running", f"since {_when(view.running_since)}"))
    if view.finished_at is not None:
        rows.append(("finished", _when(view.finished_at) + _took(view)))
    if isinstance(outcome, TaskCompleted):
        rows.append(("package", f"{outcome.package.version}  {outcome.package.digest}"))
        if outcome.aborted:
            rows.append(("aborted", outcome.aborted))
        mode = outcome.coordinator.mode
        if view.shards:
            rows.append(("coordinators", f"{view.shards} shards ({mode})"))
        else:
            rows.append(("coordinator", f"{outcome.coordinator.id} ({mode})"))
    elif view.request is not None:
        asked = view.request.version or f"channel {view.request.channel}"
        rows.append(("package", f"{asked} (asked)"))
        if view.shards:
            rows.append(("shards", f"{view.shards_done} of {view.shards} done"))
    rows += _rollout_rows(view)
    rows += _schedule_rows(view)
    if view.cancel is not None:
        why = f": {view.cancel.reason}" if view.cancel.reason else ""
        rows.append(
            ("cancel", f"asked {_when(view.cancel.time)}, grace {view.cancel.grace_s:g} s{why}")
        )
    if isinstance(outcome, TaskRejected):
        where = f", {outcome.field}" if outcome.field else ""
        rows.append(("reason", f"{outcome.reason} ({outcome.code.value}{where})"))
    trace_id = view.trace_id
    if trace_id:
        link = f"  {trace_url(jaeger_url, trace_id)}" if jaeger_url else ""
        rows.append(("trace", trace_id + link))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    if view.live:
        click.echo()
        live = sorted(view.live.values(), key=lambda u: _ORDER.get(u.status, 9))
        cut = live[:max_devices] if max_devices else live
        _table(
            ["DEVICE", "STATUS", "ATTEMPT", "PROGRESS", "MESSAGE"],
            [
                [u.device_id, u.status.value, str(u.attempt), f"{u.percent:.0f}%", _cut(u.message)]
                for u in cut
            ],
        )
        if logs and view.lines:
            click.echo()
            for recent in view.lines:
                click.echo(_line(recent.device_id, recent))
        return
    devices = sorted(view.devices, key=lambda d: _ORDER.get(d.status, 9))
    if not devices:
        return
    shown = devices[:max_devices] if max_devices else devices
    click.echo()
    _table(
        ["DEVICE", "STATUS", "ATTEMPTS", "TIME", "OUTPUT / ERROR"],
        [_device_row(d) for d in shown],
    )
    if len(shown) < len(devices):
        left = len(devices) - len(shown)
        click.echo(f"... {left} more device(s): --max-devices 0 shows all, -o json everything")
    written = [d for d in shown if d.logs]
    if written and not logs:
        click.echo(f"{len(written)} device(s) have package lines: --logs shows them")
    for device in written if logs else ():
        click.echo()
        if device.logs_dropped:
            click.echo(f"{device.device_id}: {device.logs_dropped} earlier line(s) not kept")
        for line in device.logs:
            click.echo(_line(device.device_id, line))


def _line(device_id: str, line: LogLine) -> str:
    """One package line: when, where, how loud, what (one terminal line, whatever it says)."""
    what = f"{line.percent:.0f}% {line.message}" if line.percent is not None else line.message
    at = line.at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]
    text = _escaped(what)
    return f"{at} {device_id} #{line.attempt} {line.level}: {text}"


def _state_line(view: RequestView) -> str:
    state = view.state.value
    if view.device_counts:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(view.device_counts.items()))
        return f"{state}: {counts} (of {view.device_total} devices)"
    if view.state is RequestState.RUNNING:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(view.running_counts.items()))
        return f"running: {counts} (of {view.device_total} devices)"
    if view.state is RequestState.PENDING:
        total = view.device_total
        on = f"{total} devices" if total is not None else "the devices its selector matches"
        return f"pending: published, no outcome yet ({on})"
    return state


def _device_row(device: DeviceResult) -> list[str]:
    took = ""
    if device.started_at is not None and device.finished_at is not None:
        took = f"{(device.finished_at - device.started_at).total_seconds():.2f} s"
    if device.error:
        detail = device.error
    elif device.output is not None:
        detail = json.dumps(device.output, ensure_ascii=False, separators=(",", ":"))
    else:
        detail = ""
    return [device.device_id, device.status.value, str(device.attempts), took, _cut(detail)]


def _print_list(views: list[RequestView]) -> None:
    now = datetime.now(UTC)
    rows = []
    for view in views:
        total = view.device_total
        ok = view.device_counts.get(DeviceStatus.SUCCEEDED.value, 0)
        if view.device_counts:
            devices = f"{ok}/{total} ok"
        else:
            devices = str(total) if total is not None else "selector"
        rows.append(
            [
                view.id,
                view.task or "?",
                view.version or "",
                view.state.value,
                devices,
                _age(now, view.published_at),
                _took(view).strip(" ()"),
            ]
        )
    _table(["ID", "TASK", "VERSION", "STATE", "DEVICES", "AGE", "TOOK"], rows)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  ".join(cells).rstrip())


def _cut(text: str) -> str:
    # One line per row, and nothing a package wrote steers the terminal.
    text = _escaped(" ".join(text.split()))
    return text if len(text) <= _CELL else text[: _CELL - 1] + "…"


def _escaped(text: str) -> str:
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "?"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _took(view: RequestView) -> str:
    start, end = view.published_at, view.finished_at
    if start is None or end is None:
        return ""
    return f" ({max(0.0, (end - start).total_seconds()):.1f} s)"


def _age(now: datetime, moment: datetime | None) -> str:
    if moment is None:
        return "?"
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
