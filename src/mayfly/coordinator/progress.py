"""A running request's progress, as ``dev.mayfly.task.progress`` events.

The run tells :class:`ProgressReporter` of every device's change; the
reporter keeps the counts per status and the latest word of each device that
changed, and emits them at most once per interval, the first only once the
request has run one interval: a request done sooner says nothing before its
result, and costs nothing but dictionary updates. With ``checkpoint`` (a
paced rollout) every device's result is also sent once it ended, in
``ended``, as many events as they need at each interval. Emitting never fails the
request: a sink that refuses is logged and not asked again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from mayfly.coordinator.runner import DeviceProgress
from mayfly.errors import MayflyError
from mayfly.events import (
    MAX_CHECKPOINT_BYTES,
    MAX_PROGRESS_DEVICES,
    MAX_PROGRESS_LINES,
    MAX_PROGRESS_MESSAGE,
    DeviceLine,
    DeviceResult,
    DeviceStatus,
    DeviceUpdate,
    LogLine,
    TaskProgress,
    TaskRequest,
)

__all__ = ["DEFAULT_INTERVAL_S", "ProgressReporter", "ended_before"]

#: Progress events of one request are at least this far apart.
DEFAULT_INTERVAL_S = 0.5
_LOG = logging.getLogger("mayfly.coordinator.progress")
#: The ends a checkpoint keeps: a device skipped or canceled by the stop of the
#: coordinator that reported it (not by its own doing) runs again.
_KEPT = frozenset({DeviceStatus.SUCCEEDED, DeviceStatus.FAILED, DeviceStatus.TIMED_OUT})


class ProgressReporter:
    """A :class:`~mayfly.coordinator.runner.RunReporter` emitting progress events.

    Args:
        request: the request (or shard) running.
        coordinator: the running coordinator's instance id.
        emit: where events go (the results topic); may raise :class:`MayflyError`.
        each: also told of every change (``mayfly up -v`` logs them).
        checkpoint: also send each device's result once it ended (a paced
            rollout's, read back by a coordinator picking it up).
    """

    def __init__(
        self,
        request: TaskRequest,
        coordinator: str,
        emit: Callable[[TaskProgress], None],
        *,
        each: Callable[[DeviceProgress], None] | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        checkpoint: bool = False,
    ) -> None:
        self._request = request
        self._coordinator = coordinator
        self._emit: Callable[[TaskProgress], None] | None = emit
        self._each = each
        self._interval_s = interval_s
        self._clock = clock
        self._started_at = datetime.now(UTC)
        self._next_at = clock() + interval_s
        self._total = 0
        self._status: dict[str, DeviceStatus] = {}
        self._counts: Counter[DeviceStatus] = Counter()
        self._changed: dict[str, DeviceProgress] = {}
        self._lines: deque[DeviceLine] = deque(maxlen=MAX_PROGRESS_LINES)
        self._seq = 0
        self._sent_counts: Counter[DeviceStatus] | None = None
        self._checkpoint = checkpoint
        self._ended: deque[tuple[DeviceResult, int]] = deque()

    def started(self, devices: int, skipped: int) -> None:
        """The run starts: ``devices`` to run, ``skipped`` already skipped."""
        self._started_at = datetime.now(UTC)
        self._next_at = self._clock() + self._interval_s
        self._total = devices + skipped
        self._counts = Counter({DeviceStatus.QUEUED: devices})
        if skipped:
            self._counts[DeviceStatus.SKIPPED] = skipped

    def __call__(self, progress: DeviceProgress) -> None:
        old = self._status.get(progress.device_id, DeviceStatus.QUEUED)
        if old is not progress.status:
            self._counts[old] -= 1
            self._counts[progress.status] += 1
            self._status[progress.device_id] = progress.status
        # Moved to the end: the newest news goes first when there is too much.
        self._changed.pop(progress.device_id, None)
        self._changed[progress.device_id] = progress
        if self._each is not None:
            self._each(progress)

    def ended(self, result: DeviceResult) -> None:
        """A device ended: its result goes into the next events' ``ended``."""
        if self._checkpoint:
            self._ended.append((result, len(result.model_dump_json())))

    def flush(self) -> None:
        """Emit every change and ended device now, whatever the interval."""
        self._next_at = self._clock()
        self.tick()

    def line(self, device_id: str, line: LogLine) -> None:
        """A line the package wrote: news for the next event (the latest few)."""
        self._lines.append(DeviceLine(device_id=device_id, **dict(line)))

    def tick(self) -> None:
        """Emit what changed, if an interval has passed since the last event."""
        now = self._clock()
        if self._emit is None or now < self._next_at:
            return
        self._next_at = now + self._interval_s
        if not self._changed and not self._lines and self._counts == self._sent_counts:
            return
        self._report()
        while self._ended and self._emit is not None:
            self._report()  # the rest of the checkpoint: every ended device, now

    def _report(self) -> None:
        # Latest first: a long run's oldest news waits for the next event.
        changed = list(self._changed.values())[-MAX_PROGRESS_DEVICES:]
        for progress in changed:
            del self._changed[progress.device_id]
        event = TaskProgress(
            request_id=self._request.id,
            task=self._request.task,
            priority=self._request.priority,
            traceparent=self._request.traceparent,
            tracestate=self._request.tracestate,
            shard=self._request.shard,
            coordinator=self._coordinator,
            seq=self._seq,
            started_at=self._started_at,
            devices_total=self._total,
            counts={s: n for s, n in self._counts.items() if n > 0},
            devices=tuple(_update(p) for p in changed),
            logs=tuple(self._lines),
            ended=self._take_ended(),
        )
        self._lines.clear()
        self._seq += 1
        self._sent_counts = Counter(self._counts)
        if self._emit is None:
            return
        try:
            self._emit(event)
        except MayflyError as exc:
            _LOG.warning(
                "%s: progress not reported, and no more will be: %s", event.request_id, exc
            )
            self._emit = None

    def _take_ended(self) -> tuple[DeviceResult, ...]:
        taken: list[DeviceResult] = []
        size = 0
        while self._ended and len(taken) < MAX_PROGRESS_DEVICES:
            result, encoded = self._ended[0]
            if taken and size + encoded > MAX_CHECKPOINT_BYTES:
                break
            self._ended.popleft()
            taken.append(result)
            size += encoded
        return tuple(taken)


def _update(progress: DeviceProgress) -> DeviceUpdate:
    return DeviceUpdate(
        device_id=progress.device_id,
        status=progress.status,
        percent=progress.percent,
        message=progress.message[:MAX_PROGRESS_MESSAGE],
        attempt=progress.attempt,
    )


def ended_before(reports: Iterable[TaskProgress], request_id: str) -> dict[str, DeviceResult]:
    """The devices of request ``request_id`` (a shard's own id) that ended under
    earlier coordinators, by the checkpoints in their ``reports``: each
    device's latest kept end."""
    ended: dict[str, DeviceResult] = {}
    for report in reports:
        if report.request_id != request_id:
            continue
        for result in report.ended:
            if result.status in _KEPT:
                ended[result.device_id] = result
    return ended
