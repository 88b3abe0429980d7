"""Insights for people: aligned text tables, a PNG plot, a self-contained HTML page.

matplotlib is imported only by :func:`render_png`, so a plain-text report
does not pay for it.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mayfly.aggregator.insights import (
    DeviceInsight,
    Insights,
    RejectionReason,
    TaskInsight,
    TimeBucket,
)

__all__ = [
    "RATE_SCALE",
    "device_rows",
    "format_duration",
    "format_rate",
    "problem_lines",
    "rate_colour",
    "rejection_rows",
    "render_html",
    "render_png",
    "render_text",
    "success_bars",
    "task_rows",
]

_TASK_HEADERS = (
    "TASK",
    "VERSION",
    "REQUESTS",
    "OK",
    "PARTIAL",
    "FAILED",
    "CANCELED",
    "REJECTED",
    "SUCCESS",
    "DEVICES RUN",
    "DEVICE OK",
    "PACKAGE ERRORS",
    "P50 TIME",
    "P95 TIME",
    "P50 COLD START",
)
_TASK_TEXT_COLUMNS = frozenset({0, 1})
_TASK_RATE_COLUMNS = frozenset({8, 10})
_DEVICE_HEADERS = (
    "DEVICE",
    "RUNS",
    "SUCCESS",
    "P50 TIME",
    "NOT SUCCEEDED",
    "LAST ERROR",
    "ITS REQUEST",
)
_DEVICE_TEXT_COLUMNS = frozenset({0, 4, 5, 6})
_DEVICE_RATE_COLUMNS = frozenset({2})
_REJECTION_HEADERS = ("TASK", "CODE", "COUNT", "REASON", "REQUESTS")
_REJECTION_TEXT_COLUMNS = frozenset({0, 1, 3, 4})
_MAX_ERROR = 60
#: The success-rate colour scale (plot bars, HTML cells): red at 0 %, amber at
#: 50 %, green at 100 %, interpolated between.
RATE_SCALE = ((0.0, (215, 48, 39)), (0.5, (254, 196, 79)), (1.0, (26, 152, 80)))
#: What an empty bucket, or a rate of nothing, is drawn in.
NO_RATE_COLOUR = "#bbbbbb"
#: What the problems each kind of bad number stands for are called.
_PROBLEMS = (
    ("failed", "failed"),
    ("partial", "partial"),
    ("canceled", "canceled"),
    ("rejected", "rejected"),
    ("package_errors", "package errors in"),
)


def rate_colour(rate: float | None) -> str:
    """The scale's colour of ``rate`` (0..1) as ``#rrggbb``; grey for None."""
    if rate is None:
        return NO_RATE_COLOUR
    rate = min(1.0, max(0.0, rate))
    for (low, a), (high, b) in itertools.pairwise(RATE_SCALE):
        if rate <= high:
            t = (rate - low) / (high - low)
            rgb = (round(x + (y - x) * t) for x, y in zip(a, b, strict=True))
            return "#" + "".join(f"{c:02x}" for c in rgb)
    return "#" + "".join(f"{c:02x}" for c in RATE_SCALE[-1][1])


def format_duration(seconds: float | None) -> str:
    """``850ms``, ``1.25s``, ``2m05s``, ``1h02m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.001 else f"{seconds * 1000:.2f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(rate: float | None) -> str:
    """``80.0%``; ``-`` when there was nothing to rate."""
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _clip(text: str | None, width: int = _MAX_ERROR) -> str:
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def task_rows(tasks: Sequence[TaskInsight]) -> list[tuple[str, ...]]:
    """The task table's cells, formatted: a row per task type and version."""
    return [
        (
            t.task,
            t.version,
            str(t.requests),
            str(t.succeeded),
            str(t.partial),
            str(t.failed),
            str(t.canceled),
            str(t.rejected),
            format_rate(t.success_rate),
            str(t.devices_run),
            format_rate(t.device_success_rate),
            str(t.package_errors),
            format_duration(t.p50_duration_s),
            format_duration(t.p95_duration_s),
            _ms(t.p50_cold_start_ms),
        )
        for t in tasks
    ]


def problem_lines(tasks: Sequence[TaskInsight]) -> list[str]:
    """The request ids behind each bad number, a line per task version:
    ``reboot 2.0.0: failed r7, r9; package errors in r7, r9``."""
    lines = []
    for t in tasks:
        parts = [
            f"{label} {', '.join(t.problems[kind])}"
            for kind, label in _PROBLEMS
            if t.problems.get(kind)
        ]
        if parts:
            lines.append(f"{t.task} {t.version}: {'; '.join(parts)}")
    return lines


def rejection_rows(
    reasons: Sequence[RejectionReason], *, clip: bool = True
) -> list[tuple[str, ...]]:
    """The rejection table's cells: the most frequent reasons first."""
    return [
        (
            r.task,
            r.code,
            str(r.count),
            _clip(r.reason) if clip else r.reason,
            ", ".join(r.request_ids),
        )
        for r in reasons
    ]


def device_rows(devices: Sequence[DeviceInsight], *, clip: bool = True) -> list[tuple[str, ...]]:
    """The device table's cells, formatted; the last error clipped for a terminal
    unless ``clip`` is False (HTML wraps it whole)."""
    return [
        (
            d.device_id,
            str(d.executions),
            format_rate(d.success_rate),
            format_duration(d.p50_duration_s),
            _not_succeeded(d),
            _clip(d.last_error) if clip else (d.last_error or "-"),
            d.last_error_request or "-",
        )
        for d in devices
    ]


def _not_succeeded(device: DeviceInsight) -> str:
    text = ", ".join(f"{status} {count}" for status, count in device.by_status.items()) or "-"
    if device.package_errors:
        text += f" ({device.package_errors} the package's)"
    return text


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], left: frozenset[int] = frozenset({0})
) -> list[str]:
    """Plain aligned columns: text columns (``left``) left-aligned, numbers right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _summary(insights: Insights, archive: str) -> str:
    return (
        f"{insights.results} result(s), {insights.rejections} rejection(s)"
        f" from {_when(insights.first)} to {_when(insights.last)}; archive {archive}"
    )


def _devices_title(insights: Insights) -> str:
    shown = len(insights.devices)
    return (
        f"DEVICES: worst {shown} of {insights.devices_total}"
        " (lowest success rate, most failures, slowest first; a package's"
        " failures are not held against a device)"
    )


def render_text(insights: Insights, *, archive: str) -> str:
    """The terminal report: a summary line, the task table, the requests
    behind its bad numbers, the rejections by reason, the device table."""
    lines = [_summary(insights, archive), "", "TASKS (a row per version; - : rejected, no version)"]
    lines += _table(_TASK_HEADERS, task_rows(insights.tasks), _TASK_TEXT_COLUMNS)
    problems = problem_lines(insights.tasks)
    if problems:
        lines += ["", "REQUESTS BEHIND THE BAD NUMBERS (latest first)", *problems]
    if insights.rejection_reasons:
        lines += ["", "REJECTIONS by reason"]
        lines += _table(
            _REJECTION_HEADERS,
            rejection_rows(insights.rejection_reasons),
            _REJECTION_TEXT_COLUMNS,
        )
    lines += ["", _devices_title(insights)]
    if insights.devices:
        lines += _table(_DEVICE_HEADERS, device_rows(insights.devices), _DEVICE_TEXT_COLUMNS)
    else:
        lines.append("(no device executions)")
    return "\n".join(lines)


def render_png(insights: Insights, *, title: str = "Mayfly requests over time") -> bytes:
    """Latency (p50, p95) and success rate per time bucket, as PNG bytes."""
    # Imported here: matplotlib costs a second of start-up that only plots need.
    # Figure + the Agg canvas, never pyplot: no global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    buckets = insights.buckets
    starts = [b.start for b in buckets]
    width = insights.bucket
    figure = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    latency, success = figure.subplots(2, 1, sharex=True)
    latency.plot(
        starts, [_nan(b.p50_duration_s) for b in buckets], marker="o", markersize=3, label="p50"
    )
    latency.plot(
        starts, [_nan(b.p95_duration_s) for b in buckets], marker="o", markersize=3, label="p95"
    )
    latency.set_ylabel("request duration (s)")
    latency.set_title(f"{title} ({_bucket_label(width)} buckets)")
    latency.grid(True, alpha=0.3)
    latency.legend(loc="upper left")
    heights, colours = success_bars(buckets)
    success.bar(starts, heights, width=width * 0.8, align="edge", color=colours)
    # An empty bucket: a grey tick on the axis, never confused with 0 % (a red bar).
    empty = [b.start + width * 0.4 for b in buckets if b.success_rate is None]
    if empty:
        success.plot(empty, [0.5] * len(empty), "|", color=NO_RATE_COLOUR, label="no request")
        success.legend(loc="lower left")
    success.set_ylabel("success rate (%)")
    success.set_ylim(0, 105)
    success.grid(True, axis="y", alpha=0.3)
    success.set_xlabel("time (UTC)")
    _colour_bar(figure, success)
    figure.autofmt_xdate()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def _colour_bar(figure: Any, axes: Any) -> None:
    """The rate scale beside the success plot, so a colour reads as a rate."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    stops = [(at, tuple(c / 255 for c in rgb)) for at, rgb in RATE_SCALE]
    scale = LinearSegmentedColormap.from_list("mayfly-rate", stops)
    mappable = ScalarMappable(norm=Normalize(0, 100), cmap=scale)
    figure.colorbar(mappable, ax=axes, label="success (%)", pad=0.01)


#: Height (percentage points) of the bar of a bucket whose requests all failed:
#: drawn, in the scale's red, so it never looks like a bucket with no request.
ZERO_BAR = 2.0


def success_bars(buckets: Sequence[TimeBucket]) -> tuple[list[float], list[str]]:
    """The success-rate bars: height in percent and the scale's colour of each
    bucket's rate. A bucket with requests and 0 % success gets a short red bar;
    an empty one none (nan)."""
    heights, colours = [], []
    for bucket in buckets:
        rate = bucket.success_rate
        colours.append(rate_colour(rate))
        if rate is None:
            heights.append(float("nan"))
        elif rate == 0:
            heights.append(ZERO_BAR)
        else:
            heights.append(rate * 100)
    return heights, colours


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _bucket_label(width: timedelta) -> str:
    """``2s``, ``90s``, ``5min``, ``3h``, ``1d``: the largest unit that divides it."""
    seconds = width.total_seconds()
    if seconds != int(seconds) or seconds < 1:
        return f"{seconds:g}s"
    whole = int(seconds)
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def _html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    text: frozenset[int] = frozenset({0}),
    rates: frozenset[int] = frozenset(),
    wrap: frozenset[int] = frozenset(),
) -> str:
    """A table: ``text`` columns left-aligned, only ``wrap`` ones wrapped (an
    error, a reason); ``rates`` cells on the rate scale's colour (their value
    read back from the ``80.0%`` they show)."""

    def kind(index: int) -> str:
        names = [n for n, cols in (("text", text), ("wrap", wrap)) if index in cols]
        return f' class="{" ".join(names)}"' if names else ""

    head = "".join(f"<th{kind(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(_cell(cell, kind(i), i in rates) for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(cell: str, classes: str, rate_cell: bool) -> str:
    style = ""
    if rate_cell:
        rate = float(cell.rstrip("%")) / 100 if cell.endswith("%") else None
        style = f' style="background:{rate_colour(rate)}"'
    return f"<td{classes}{style}>{html.escape(cell)}</td>"


def _html_problems(insights: Insights) -> str:
    lines = problem_lines(insights.tasks)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<h3>Requests behind the bad numbers (latest first)</h3><ul>{items}</ul>"


def _html_rejections(insights: Insights) -> str:
    if not insights.rejection_reasons:
        return ""
    table = _html_table(
        _REJECTION_HEADERS,
        rejection_rows(insights.rejection_reasons, clip=False),
        text=_REJECTION_TEXT_COLUMNS,
        wrap=frozenset({3, 4}),
    )
    return f"<h2>Rejections by reason</h2>{table}"


def render_html(insights: Insights, png: bytes, *, archive: str) -> str:
    """A self-contained page: the plot embedded as base64 PNG, then both tables."""
    image = base64.b64encode(png).decode("ascii")
    tasks = _html_table(
        _TASK_HEADERS,
        task_rows(insights.tasks),
        text=_TASK_TEXT_COLUMNS,
        rates=_TASK_RATE_COLUMNS,
    )
    devices = _html_table(
        _DEVICE_HEADERS,
        device_rows(insights.devices, clip=False),
        text=_DEVICE_TEXT_COLUMNS,
        rates=_DEVICE_RATE_COLUMNS,
        wrap=frozenset({5}),
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Mayfly report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: right;
  white-space: nowrap; vertical-align: top; }}
th.text, td.text {{ text-align: left; }}
th.wrap, td.wrap {{ white-space: normal; min-width: 20rem; }}
th {{ background: #f4f4f4; }}
li {{ margin-bottom: 0.3rem; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>Mayfly report</h1>
<p>{html.escape(_summary(insights, archive))}</p>
<img alt="request latency and success rate over time" src="data:image/png;base64,{image}">
<h2>Tasks</h2>
<p>A row per task type and package version; rejected requests ran no version (-).
Success cells are coloured from red (0 %) through amber (50 %) to green (100 %).</p>
{tasks}
{_html_problems(insights)}
{_html_rejections(insights)}
<h2>Devices</h2>
<p>{html.escape(_devices_title(insights).removeprefix("DEVICES: ").capitalize())}</p>
{devices}
</body>
</html>
"""
