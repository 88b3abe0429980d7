"""Insights for people: aligned text tables, a PNG plot, a self-contained HTML page.

matplotlib is imported only by :func:`render_png`, so a plain-text report
does not pay for it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import datetime, timedelta

from mayfly.aggregator.insights import DeviceInsight, Insights, TaskInsight, TimeBucket

__all__ = [
    "device_rows",
    "format_duration",
    "format_rate",
    "render_html",
    "render_png",
    "render_text",
    "success_bars",
    "task_rows",
]

_TASK_HEADERS = (
    "TASK",
    "REQUESTS",
    "REJECTED",
    "SUCCESS",
    "DEVICES RUN",
    "DEVICE OK",
    "P50 TIME",
    "P95 TIME",
    "P50 COLD START",
)
_DEVICE_HEADERS = ("DEVICE", "RUNS", "SUCCESS", "P50 TIME", "NOT SUCCEEDED", "LAST ERROR")
_DEVICE_TEXT_COLUMNS = frozenset({0, 4, 5})
_MAX_ERROR = 60


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
    """The task table's cells, formatted."""
    return [
        (
            t.task,
            str(t.requests),
            str(t.rejected),
            format_rate(t.success_rate),
            str(t.devices_run),
            format_rate(t.device_success_rate),
            format_duration(t.p50_duration_s),
            format_duration(t.p95_duration_s),
            _ms(t.p50_cold_start_ms),
        )
        for t in tasks
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
            ", ".join(f"{status} {count}" for status, count in d.by_status.items()) or "-",
            _clip(d.last_error) if clip else (d.last_error or "-"),
        )
        for d in devices
    ]


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
        " (lowest success rate, most failures, slowest first)"
    )


def render_text(insights: Insights, *, archive: str) -> str:
    """The terminal report: a summary line, the task table, the device table."""
    lines = [_summary(insights, archive), "", "TASKS"]
    lines += _table(_TASK_HEADERS, task_rows(insights.tasks))
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
    success.set_ylabel("success rate (%)")
    success.set_ylim(0, 105)
    success.grid(True, axis="y", alpha=0.3)
    success.set_xlabel("time (UTC)")
    figure.autofmt_xdate()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


#: Height (percentage points) of the bar of a bucket whose requests all failed:
#: drawn, in red, so it never looks like a bucket with no request at all.
ZERO_BAR = 2.0


def success_bars(buckets: Sequence[TimeBucket]) -> tuple[list[float], list[str]]:
    """The success-rate bars: height in percent and colour per bucket. A bucket
    with requests and 0 % success gets a short red bar; an empty one none (nan)."""
    heights, colours = [], []
    for bucket in buckets:
        rate = bucket.success_rate
        if rate is None:
            heights.append(float("nan"))
            colours.append("tab:green")
        elif rate == 0:
            heights.append(ZERO_BAR)
            colours.append("tab:red")
        else:
            heights.append(rate * 100)
            colours.append("tab:green")
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


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(insights: Insights, png: bytes, *, archive: str) -> str:
    """A self-contained page: the plot embedded as base64 PNG, then both tables."""
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Mayfly report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3rem 0.8rem; text-align: right; }}
th:first-child, td:first-child, td:last-child {{ text-align: left; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }}
</style>
</head>
<body>
<h1>Mayfly report</h1>
<p>{html.escape(_summary(insights, archive))}</p>
<img alt="request latency and success rate over time" src="data:image/png;base64,{image}">
<h2>Tasks</h2>
{_html_table(_TASK_HEADERS, task_rows(insights.tasks))}
<h2>Devices</h2>
<p>{html.escape(_devices_title(insights).removeprefix("DEVICES: ").capitalize())}</p>
{_html_table(_DEVICE_HEADERS, device_rows(insights.devices, clip=False))}
</body>
</html>
"""
