"""What a request would do, worked out without running it: ``mayfly plan``.

The same steps a coordinator takes before it touches a device (the package
resolved, fetched and verified, the params checked, the targets resolved,
the devices lacking a capability set aside, the request cut into shards),
stopped there: nothing is run, published or sent to a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mayfly.coordinator.core import Coordinator, split_by_capability
from mayfly.coordinator.pacing import PaceStep, pace_steps, starts_span_s
from mayfly.coordinator.schedule import Span, open_spans
from mayfly.errors import MayflyError, PreflightError
from mayfly.events import Abort, Rollback, TaskRequest, rollback_requests, shard_request

__all__ = ["Outline", "check_rollback", "outline"]


@dataclass(frozen=True)
class Outline:
    """One request's plan."""

    request: TaskRequest
    version: str
    """The package version its ref resolves to now."""
    digest: str
    devices: tuple[str, ...]
    """The devices it would run on, in order."""
    skipped: dict[str, str]
    """Devices it targets but would skip, with the reason."""
    shards: tuple[int, ...]
    """Devices per shard (one entry: it runs whole, in one coordinator)."""
    parallel: int
    """Devices run at once in each coordinator."""
    timeout_s: float
    device_timeout_s: float
    retries: int
    memory_mb: int
    max_failure_ratio: float | None
    abort: Abort | None = None
    rollback: Rollback | None = None
    pace: tuple[PaceStep, ...] = ()
    """A paced rollout's stretches at one pace, over the whole request (empty: unpaced)."""
    start_span_s: float | None = None
    """Seconds from the first device's start to the last one's at that pace."""
    windows: tuple[Span, ...] = ()
    """A scheduled rollout's next stretches in which devices may start, from
    when it was planned (empty: unscheduled, or its schedule ended)."""

    @property
    def opens_at(self) -> datetime | None:
        """When a scheduled rollout's first device may start."""
        return self.windows[0][0] if self.windows else None

    @property
    def rollout_waves(self) -> list[int]:
        """Devices in each of the rollout's waves (over the whole request)."""
        sizes: dict[int, int] = {}
        for step in self.pace:
            sizes[step.wave] = sizes.get(step.wave, 0) + step.devices
        return [sizes[w] for w in sorted(sizes)]

    @property
    def stop_after_failures(self) -> int | None:
        """Failed devices (of one coordinator's) past which the rest are skipped."""
        if self.max_failure_ratio is None:
            return None
        return math.floor(self.max_failure_ratio * max(self.shards))

    @property
    def waves(self) -> int:
        """Rounds of ``parallel`` devices the largest shard takes, at least."""
        return math.ceil(max(self.shards) / self.parallel) if self.devices else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request.id,
            "task": self.request.task,
            "priority": self.request.priority.value,
            "asked": self.request.version or f"channel {self.request.channel}",
            "version": self.version,
            "digest": self.digest,
            "devices": list(self.devices),
            "skipped": dict(self.skipped),
            "shards": list(self.shards),
            "parallel": self.parallel,
            "waves": self.waves,
            "limits": {
                "timeout_s": self.timeout_s,
                "device_timeout_s": self.device_timeout_s,
                "retries": self.retries,
                "memory_mb": self.memory_mb,
            },
            "max_failure_ratio": self.max_failure_ratio,
            "stop_after_failures": self.stop_after_failures,
            "abort": self.abort.model_dump(mode="json") if self.abort else None,
            "on_abort": self.rollback.model_dump(mode="json") if self.rollback else None,
            "deadline": self.request.deadline.isoformat() if self.request.deadline else None,
            "pace": {
                "rollout_waves": self.rollout_waves,
                "steps": [
                    {"devices": s.devices, "per_minute": s.per_minute, "wave": s.wave}
                    for s in self.pace
                ],
                "start_span_s": self.start_span_s,
            }
            if self.pace
            else None,
            "schedule": self._schedule_dict(),
            "continuous": rollout.continuous.model_dump(mode="json")
            if (rollout := self.request.rollout) and rollout.continuous
            else None,
        }

    def _schedule_dict(self) -> dict[str, Any] | None:
        rollout = self.request.rollout
        schedule = rollout.schedule if rollout else None
        if schedule is None:
            return None
        return {
            **schedule.model_dump(mode="json"),
            "opens_at": self.opens_at.isoformat() if self.opens_at else None,
            "next_windows": [
                {"opens": opens.isoformat(), "closes": closes.isoformat() if closes else None}
                for opens, closes in self.windows
            ],
        }


def outline(coordinator: Coordinator, request: TaskRequest, now: datetime | None = None) -> Outline:
    """What ``coordinator`` would do with ``request``, planned at ``now``.

    Raises:
        MayflyError: what the coordinator would reject the request for.
    """
    fetched, targets = coordinator.preflight(request)
    check_rollback(coordinator, request, [d.id for d in targets])
    manifest = fetched.manifest
    runnable, skipped = split_by_capability(targets, manifest.capabilities)
    size = coordinator.shard_size_of(request)
    shards: tuple[int, ...] = (len(targets),)
    if size is not None and len(targets) > size:
        cut = shard_request(request, [d.id for d in targets], size, version=manifest.version)
        shards = tuple(len(s.devices) for s in cut)
    limits = manifest.limits
    rollout = request.rollout
    parallel = coordinator.parallelism(request, limits, max(shards))
    paced = rollout is not None and rollout.paced
    count = len(runnable)
    return Outline(
        request=request,
        version=manifest.version,
        digest=fetched.digest,
        devices=tuple(d.id for d in runnable),
        skipped=skipped,
        shards=shards,
        parallel=parallel,
        timeout_s=limits.timeout_s,
        device_timeout_s=limits.device_timeout_s,
        retries=limits.retries,
        memory_mb=limits.memory_mb,
        max_failure_ratio=rollout.max_failure_ratio if rollout else None,
        abort=rollout.abort if rollout else None,
        rollback=rollout.on_abort if rollout else None,
        pace=tuple(pace_steps(rollout, count)) if rollout and paced and count else (),
        start_span_s=starts_span_s(rollout, count) if rollout and paced and count else None,
        windows=tuple(open_spans(rollout.schedule, now or datetime.now(UTC), limit=5))
        if rollout and rollout.schedule
        else (),
    )


def check_rollback(coordinator: Coordinator, request: TaskRequest, devices: list[str]) -> None:
    """Check the request's ``rollout.on_abort`` as its coordinator would check
    the rollback request (its package, its params), over ``devices``.

    Raises:
        PreflightError: naming the rollback and what is wrong with it.
    """
    rollback = request.rollout.on_abort if request.rollout else None
    if rollback is None or not devices:
        return
    try:
        # One is enough: every one has the same task, version and params.
        coordinator.preflight(rollback_requests(request, rollback, devices)[0])
    except MayflyError as exc:
        raise PreflightError(f"its on_abort rollback ({rollback.task}): {exc}", exc) from exc
