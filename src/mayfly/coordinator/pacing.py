"""A rollout's pace: how fast devices start, and in which waves.

The runner asks :class:`Pace` before each device's first attempt (retries are
not paced: they belong to a device already started). Everything here is
arithmetic on counts and a monotonic clock the caller passes in, so a
coordinator that picks a request up again after another one died (its ended
devices given back, see :mod:`mayfly.coordinator.runner`) goes on where that
one stopped: the ramp's step follows from the successes so far, the wave from
the devices ended so far, and the rate from now on.

A request cut into shards shares its pace: each shard starts its devices at
its share of the rate (``share``), so the shards together keep the request's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mayfly.events import Rollout, TaskRequest
from mayfly.events.requested import MAX_PER_MINUTE

__all__ = [
    "Pace",
    "PaceStep",
    "pace_steps",
    "run_budget_s",
    "share_of",
    "starts_span_s",
    "wave_bounds",
]

#: Starts one pace may bank while nothing could start (every process busy),
#: in seconds of its rate: a short catch-up, never a burst of a whole minute.
_BANK_S = 0.1
#: A start due by the clock is not held back by a rounding error of the credit.
_EPSILON = 1e-9


def wave_bounds(waves: Sequence[int | str] | None, total: int) -> list[int]:
    """Where each wave ends, counted in devices from the first: ``[10, 35, 100]``
    for waves ``[10, "25%"]`` over 100 devices. A share is of ``total``,
    rounded up so no wave is empty; the devices left after the last listed
    wave are one more; the bounds never pass ``total``."""
    bounds: list[int] = []
    end = 0
    for wave in waves or ():
        size = wave if isinstance(wave, int) else math.ceil(total * float(wave[:-1]) / 100.0)
        end = min(total, end + max(1, size))
        if not bounds or end > bounds[-1]:
            bounds.append(end)
    if not bounds or bounds[-1] < total:
        bounds.append(total)
    return bounds


def _per_minute(rollout: Rollout, succeeded: int) -> float | None:
    """The request's whole pace once ``succeeded`` devices succeeded."""
    if rollout.rate_per_minute is not None:
        return rollout.rate_per_minute
    ramp = rollout.ramp
    if ramp is None:
        return None
    top = ramp.max_per_minute if ramp.max_per_minute is not None else MAX_PER_MINUTE
    try:
        rate = ramp.base_per_minute * ramp.increment_factor ** (succeeded // ramp.increase_after)
    except OverflowError:  # a long ramp without a maximum: the highest pace there is
        rate = top
    return min(rate, top)


class Pace:
    """Whether a device may start now, by a rollout's rate, ramp and waves.

    Args:
        rollout: the request's rollout.
        total: the devices of this run (a shard's own), ended ones included.
        now: the clock's reading at the start.
        share: this run's share of the request's rate (1 / shards).
    """

    def __init__(self, rollout: Rollout, total: int, *, now: float, share: float = 1.0) -> None:
        self.rollout = rollout
        self.share = share
        self.bounds = wave_bounds(rollout.waves, total)
        self._credit = 1.0  # the first device starts at once
        self._at = now

    def per_second(self, succeeded: int) -> float | None:
        """This run's pace once ``succeeded`` devices succeeded (None: no rate)."""
        rate = _per_minute(self.rollout, succeeded)
        return None if rate is None else rate * self.share / 60.0

    def wave_limit(self, ended: int) -> int:
        """Devices that may have started while ``ended`` have ended: up to the end
        of the first wave not wholly ended."""
        for bound in self.bounds:
            if bound > ended:
                return bound
        return self.bounds[-1]

    def wave_of(self, ended: int) -> int:
        """The wave running (1-based) while ``ended`` devices have ended."""
        return next((i for i, b in enumerate(self.bounds, 1) if b > ended), len(self.bounds))

    def _refill(self, now: float, succeeded: int) -> float | None:
        rate = self.per_second(succeeded)
        if rate is not None and now > self._at:
            self._credit = min(max(1.0, rate * _BANK_S), self._credit + (now - self._at) * rate)
        self._at = max(self._at, now)
        return rate

    def take(self, now: float, *, started: int, ended: int, succeeded: int) -> bool:
        """Whether one more device may start now; if so, it is counted as started.

        ``started``, ``ended`` and ``succeeded`` count this run's devices that
        did (an earlier coordinator's included)."""
        if started >= self.wave_limit(ended):
            return False
        rate = self._refill(now, succeeded)
        if rate is None:
            return True
        if self._credit < 1.0 - _EPSILON:
            return False
        self._credit -= 1.0
        return True

    def next_at(self, now: float, succeeded: int) -> float | None:
        """When the rate allows the next start (None: not the rate's to say)."""
        rate = self._refill(now, succeeded)
        if rate is None or self._credit >= 1.0 - _EPSILON:
            return None
        return now + (1.0 - self._credit) / rate


@dataclass(frozen=True)
class PaceStep:
    """A stretch of a rollout at one pace: ``devices`` started at ``per_minute``."""

    devices: int
    per_minute: float | None
    wave: int


def pace_steps(rollout: Rollout, total: int) -> list[PaceStep]:
    """How a rollout over ``total`` devices would go if every device succeeded:
    its waves, and in each the stretches at one pace (a ramp's steps)."""
    steps: list[PaceStep] = []
    start = 0
    for wave, bound in enumerate(wave_bounds(rollout.waves, total), 1):
        at = start
        while at < bound:
            rate = _per_minute(rollout, at)
            ramp = rollout.ramp
            if ramp is None or rate == (ramp.max_per_minute or MAX_PER_MINUTE):
                until = bound
            else:
                until = min(bound, (at // ramp.increase_after + 1) * ramp.increase_after)
            steps.append(PaceStep(until - at, rate, wave))
            at = until
        start = bound
    return steps


def starts_span_s(rollout: Rollout, total: int, share: float = 1.0) -> float | None:
    """Seconds from the first device's start to the last one's, at the pace
    given (times ``share``) and if every device succeeds; None when there is
    no rate (the waves then go as fast as their devices end)."""
    steps = pace_steps(rollout, total)
    if not steps or any(step.per_minute is None for step in steps):
        return None
    gaps = sum(step.devices * 60.0 / step.per_minute for step in steps if step.per_minute)
    last = steps[-1].per_minute
    assert last is not None
    return max(0.0, gaps - 60.0 / last) / share  # no wait after the last start


def share_of(request: TaskRequest) -> float:
    """A request's share of its rollout's rate: a shard's is one in its count."""
    return 1.0 / request.shard.count if request.shard is not None else 1.0


def run_budget_s(request: TaskRequest, timeout_s: float, devices: int) -> float:
    """How long ``request`` may run over ``devices``: its package's
    ``timeout_s``, plus, for a paced rollout, the time its pace takes to start
    them all (the package's budget is for the work, not for the waiting)."""
    rollout = request.rollout
    if rollout is None or not rollout.paced:
        return timeout_s
    return timeout_s + (starts_span_s(rollout, devices, share_of(request)) or 0.0)
