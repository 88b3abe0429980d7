"""The dispatcher's decisions as pure functions: no I/O, no clock, no processes.

Kept apart from the loop that applies them (:mod:`mayfly.runtime.dispatcher`)
so each can be tested on plain values:

- :func:`pick_lane`: which priority lane starts next (smooth weighted
  round-robin: high first, low never starved);
- :func:`commit_progress`: how far each partition may be committed when
  records finish out of order;
- :func:`position_of`: where a partition stands, for the next member of the
  group to take it over from (what is done after the committed offset too);
- :func:`after_crash`: retry a crashed request after a backoff, or give up
  on it once it has used its failure budget.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence, Set
from dataclasses import dataclass

from mayfly.events import Priority
from mayfly.positions import Position

__all__ = [
    "DEFAULT_WEIGHTS",
    "CrashDecision",
    "after_crash",
    "commit_progress",
    "pick_lane",
    "position_of",
]

DEFAULT_WEIGHTS: Mapping[Priority, int] = {Priority.HIGH: 8, Priority.NORMAL: 3, Priority.LOW: 1}


def pick_lane(
    candidates: Sequence[Priority],
    credits: MutableMapping[Priority, int],
    weights: Mapping[Priority, int] = DEFAULT_WEIGHTS,
) -> Priority | None:
    """The lane to start from, among those with startable work.

    Smooth weighted round-robin (as nginx balances upstreams): every candidate
    earns its weight, the richest is picked and pays the round's total. Over
    any window each lane gets its weight's share, spread out rather than in
    bursts; ties go to the higher priority. ``credits`` is updated in place.
    """
    if not candidates:
        return None
    total = 0
    for lane in candidates:
        weight = weights.get(lane, 1)
        credits[lane] = credits.get(lane, 0) + weight
        total += weight
    order = list(Priority)
    chosen = max(candidates, key=lambda lane: (credits[lane], -order.index(lane)))
    credits[chosen] -= total
    return chosen


def commit_progress(
    next_offsets: Mapping[int, int],
    outstanding: Mapping[int, Set[int]],
    committed: Mapping[int, int],
) -> dict[int, int]:
    """Per partition, the offset to commit now, where it moved forward.

    Records finish out of order (many coordinators at once); committing past
    one still running would lose it in a crash. So each partition commits up
    to its first unfinished record, else up to the next offset to read.
    """
    changes: dict[int, int] = {}
    for partition, next_offset in next_offsets.items():
        pending = outstanding.get(partition)
        target = min(pending) if pending else next_offset
        if target > committed.get(partition, 0):
            changes[partition] = target
    return changes


def position_of(next_offset: int, outstanding: Set[int], before: Position | None) -> Position:
    """Where one partition stands: its first record not done (else the next to
    read), and, after it, every record read is done but the ``outstanding``
    ones. What ``before`` (the previous member's position) still claims beyond
    what was read is kept, so a record it finished is not run by the next
    member either.
    """
    offset = min(outstanding) if outstanding else next_offset
    pending = set(outstanding)
    until = next_offset
    if before is not None and before.done_until > next_offset:
        until = before.done_until
        pending |= {o for o in before.pending if o >= next_offset}
    return Position(offset, until, frozenset(pending))


@dataclass(frozen=True)
class CrashDecision:
    """What to do with a request whose coordinator did not make a result durable."""

    give_up: bool
    """Dead-letter it: it used its failure budget."""
    retry_in_s: float = 0.0
    """Otherwise, wait this long before starting it again."""


def after_crash(
    crashes: int,
    max_crashes: int,
    *,
    base_s: float = 0.1,
    cap_s: float = 5.0,
) -> CrashDecision:
    """Retry with exponential backoff (``base_s``, doubling, at most ``cap_s``)
    until ``max_crashes`` crashes, then give up.

    A backoff keeps a coordinator that dies at once (a store that is down, a
    broker restarting) from being restarted in a tight loop.
    """
    if crashes >= max_crashes:
        return CrashDecision(give_up=True)
    return CrashDecision(give_up=False, retry_in_s=min(cap_s, base_s * 2 ** max(0, crashes - 1)))
