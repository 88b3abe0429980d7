"""When a scheduled rollout's devices may start (``rollout.schedule``).

A schedule is a start (``not_before``), an end (``not_after``) and recurring
maintenance windows in a time zone. No coordinator waits for a window: one
that finds its request's schedule closed says when it opens, and the runtime
holds the request's record (uncommitted) until then, so a restart cannot
start it early; one whose window closes mid-run stops starting devices,
checkpoints what ended and hands the rest over the same way.

Pure functions of the schedule and a UTC instant; no clock is read here.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from mayfly.events import Schedule, TaskRequest, Window

__all__ = ["Deferred", "Span", "closes_at", "open_spans", "opens_at"]

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Days of windows looked at ahead: every weekday, and a window over midnight.
_HORIZON_DAYS = 9

#: A stretch of time devices may start in: from, until (None: for ever).
Span = tuple[datetime, datetime | None]


@dataclass(frozen=True)
class Deferred:
    """A request its schedule holds: nothing of it may start before ``until``
    (what ended of it already is in its checkpoints)."""

    request: TaskRequest
    until: datetime
    reason: str


def _clock(text: str) -> time:
    parts = [int(p) for p in text.split(":")]
    return time(parts[0], parts[1], parts[2] if len(parts) > 2 else 0)


def _window_span(
    window: Window, day: date, zone: zoneinfo.ZoneInfo
) -> tuple[datetime, datetime] | None:
    """The window on local ``day`` in UTC, if it opens that day."""
    if _DAYS[day.weekday()] not in window.days:
        return None
    start, end = _clock(window.start), _clock(window.end)
    end_day = day + timedelta(days=1) if end <= start else day
    opens = datetime.combine(day, start, tzinfo=zone).astimezone(UTC)
    closes = datetime.combine(end_day, end, tzinfo=zone).astimezone(UTC)
    return (opens, closes) if closes > opens else None  # a window a DST shift ate


def open_spans(schedule: Schedule, now: datetime, *, limit: int = 20) -> list[Span]:
    """The stretches of time from ``now`` on in which devices may start, in
    order (at most ``limit``, and within the windows' next nine days); the
    last one's end is None when it never closes."""
    low = max(now, schedule.not_before) if schedule.not_before is not None else now
    high = schedule.not_after
    if high is not None and low >= high:
        return []
    if not schedule.windows:
        return [(low, high)]
    zone = zoneinfo.ZoneInfo(schedule.time_zone)
    first = low.astimezone(zone).date() - timedelta(days=1)
    found: list[tuple[datetime, datetime]] = []
    for offset in range(_HORIZON_DAYS):
        for window in schedule.windows:
            span = _window_span(window, first + timedelta(days=offset), zone)
            if span is not None:
                found.append(span)
    merged: list[Span] = []
    for opens, closes in sorted(found):
        if closes <= low:
            continue
        opens = max(opens, low)
        if high is not None:
            if opens >= high:
                break
            closes = min(closes, high)
        last = merged[-1] if merged else None
        if last is not None and last[1] is not None and opens <= last[1]:
            merged[-1] = (last[0], max(last[1], closes))  # overlapping windows: one
        else:
            merged.append((opens, closes))
    return merged[:limit]


def opens_at(schedule: Schedule, now: datetime) -> datetime | None:
    """When devices may start, from ``now`` on (``now`` itself when they may
    now); None when they never may again (past ``not_after``)."""
    spans = open_spans(schedule, now, limit=1)
    return spans[0][0] if spans else None


def closes_at(schedule: Schedule, now: datetime) -> datetime | None:
    """When the stretch open at ``now`` ends (None: it never does). Only for a
    ``now`` at which the schedule is open (see :func:`opens_at`)."""
    spans = open_spans(schedule, now, limit=1)
    return spans[0][1] if spans else now
