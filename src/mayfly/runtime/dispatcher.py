"""The dispatcher: serves the priority lanes and hands requests to coordinators.

What it promises, on the embedded log and on Kafka alike:

- **priority without starvation**: lanes are picked by smooth weighted
  round-robin (high 8, normal 3, low 1 by default), so a high request starts
  ahead of any low backlog, yet low still gets its share;
- **order per partition key**: two requests with the same key (one device's
  tasks) never run at once, and start in log order;
- **caps**: at most ``max_coordinators`` coordinator processes at once, and
  at most ``per_task_cap`` of one task type;
- **at least once, applied once**: a lane's offset is committed only up to
  the last request whose result is durable (the coordinator appends it before
  it exits); after a crash the rest is delivered again, requests that already
  have a result are skipped, and devices dedupe repeated actions by key;
- **poison requests end**: a request whose coordinator keeps crashing is
  rejected to the dead-letter topic after ``max_crashes`` crashes.
"""

from __future__ import annotations

import collections
import itertools
import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mayfly.errors import CoordinatorCrashedError
from mayfly.events import Priority, peek_attributes, rejection_for
from mayfly.runtime.eventlog import DEFAULT_TOPICS, EventLog, LogConsumer, LogRecord, Topics
from mayfly.runtime.logsink import EventLogSink
from mayfly.runtime.spawner import CoordinatorExit, Spawner
from mayfly.runtime.state import RuntimeState

__all__ = ["DEFAULT_WEIGHTS", "Dispatcher", "DispatcherOptions"]

_LOG = logging.getLogger("mayfly.runtime.dispatcher")
DEFAULT_WEIGHTS = {Priority.HIGH: 8, Priority.NORMAL: 3, Priority.LOW: 1}
#: Exit codes after which the result is durable (see mayfly.coordinator.entry).
_DELIVERED = frozenset({0, 3, 4, 5})


@dataclass(frozen=True)
class DispatcherOptions:
    group: str = "mayfly-dispatcher"
    max_coordinators: int = 8
    per_task_cap: int = 4
    weights: dict[Priority, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    max_crashes: int = 3
    buffer: int = 64
    """Records read ahead per lane."""
    idle_wait_s: float = 0.01


@dataclass
class _Pending:
    lane: Priority
    record: LogRecord
    request_id: str
    task: str
    key: str


class _Lane:
    def __init__(self, priority: Priority, consumer: LogConsumer) -> None:
        self.priority = priority
        self.consumer = consumer
        self.buffer: collections.deque[_Pending] = collections.deque()
        # Per partition: offsets read but not done, and the next offset to read.
        self.outstanding: dict[int, set[int]] = collections.defaultdict(set)
        self.next_offset: dict[int, int] = dict(consumer.committed())
        self.committed: dict[int, int] = dict(self.next_offset)
        self.credit = 0

    def read(self, record: LogRecord) -> None:
        self.outstanding[record.partition].add(record.offset)
        self.next_offset[record.partition] = record.offset + 1

    def done(self, record: LogRecord) -> None:
        self.outstanding[record.partition].discard(record.offset)
        self.commit_progress()

    def commit_progress(self) -> None:
        """Commit, per partition, up to the first record not yet done.

        Records finish out of order (many coordinators at once); committing
        past an unfinished one would lose it in a crash.
        """
        changes: dict[int, int] = {}
        for partition, next_offset in self.next_offset.items():
            pending = self.outstanding.get(partition)
            target = min(pending) if pending else next_offset
            if target > self.committed.get(partition, 0):
                changes[partition] = target
        if changes:
            self.consumer.commit(changes)
            self.committed.update(changes)


class Dispatcher:
    """Single-threaded loop: poll lanes, start coordinators, reap exits, commit."""

    def __init__(
        self,
        log: EventLog,
        spawner: Spawner,
        state: RuntimeState,
        options: DispatcherOptions | None = None,
        on_event: Callable[[str, dict[str, object]], None] | None = None,
        topics: Topics = DEFAULT_TOPICS,
    ) -> None:
        self.options = options or DispatcherOptions()
        self.spawner = spawner
        self.state = state
        self.log = log
        self.sink = EventLogSink(log, topics)
        self.lanes = {
            p: _Lane(p, log.consumer(self.options.group, topics.lane(p))) for p in Priority
        }
        self.running: dict[str, _Pending] = {}
        self._tokens = itertools.count()
        self._on_event = on_event or (lambda _kind, _info: None)

    # -- reading ---------------------------------------------------------------

    def _fill(self) -> None:
        for lane in self.lanes.values():
            room = self.options.buffer - len(lane.buffer)
            if room <= 0:
                continue
            for record in lane.consumer.poll(room, 0.0):
                attrs = peek_attributes(record.headers, record.value)
                pending = _Pending(
                    lane=lane.priority,
                    record=record,
                    request_id=str(
                        attrs.get("id") or f"{record.topic}/{record.partition}@{record.offset}"
                    ),
                    task=str(attrs.get("tasktype") or "?"),
                    key=str(
                        attrs.get("partitionkey") or (record.key or b"").decode("utf-8", "replace")
                    ),
                )
                lane.read(record)
                lane.buffer.append(pending)

    # -- choosing --------------------------------------------------------------

    def _startable(self, lane: _Lane) -> _Pending | None:
        """The first record of the lane that may start now, keeping key order."""
        running_keys = {p.key for p in self.running.values()}
        per_task = collections.Counter(p.task for p in self.running.values())
        blocked: set[str] = set()
        for pending in lane.buffer:
            if pending.key in running_keys or pending.key in blocked:
                blocked.add(pending.key)
                continue
            if per_task[pending.task] >= self.options.per_task_cap:
                blocked.add(pending.key)
                continue
            return pending
        return None

    def _pick(self) -> _Pending | None:
        candidates = [
            (lane, p) for lane in self.lanes.values() if (p := self._startable(lane)) is not None
        ]
        if not candidates:
            return None
        # Smooth weighted round-robin over the lanes that have work.
        total = 0
        for lane, _ in candidates:
            weight = self.options.weights.get(lane.priority, 1)
            lane.credit += weight
            total += weight
        lane, pending = max(
            candidates, key=lambda c: (c[0].credit, -list(Priority).index(c[0].priority))
        )
        lane.credit -= total
        lane.buffer.remove(pending)
        return pending

    # -- starting and finishing -----------------------------------------------

    def _done(self, pending: _Pending) -> None:
        self.lanes[pending.lane].done(pending.record)

    def _start_ready(self) -> None:
        while len(self.running) < self.options.max_coordinators:
            pending = self._pick()
            if pending is None:
                return
            if self.state.has_result(pending.request_id):
                self._on_event("skipped", {"request_id": pending.request_id})
                self._done(pending)
                continue
            token = f"{next(self._tokens)}:{pending.request_id}"
            self.running[token] = pending
            self.spawner.spawn(token, pending.record, datetime.now(UTC))
            self._on_event(
                "started",
                {
                    "request_id": pending.request_id,
                    "priority": pending.lane.value,
                    "task": pending.task,
                },
            )

    def _on_exit(self, ended: CoordinatorExit) -> None:
        pending = self.running.pop(ended.token, None)
        if pending is None:
            return
        if ended.returncode in _DELIVERED:
            self.state.mark_result(pending.request_id)
            self._done(pending)
            self._on_event("finished", {"request_id": pending.request_id, "code": ended.returncode})
            return
        crashes = self.state.add_crash(pending.request_id)
        why = (
            f"signal {-ended.returncode}"
            if ended.returncode < 0
            else f"exit code {ended.returncode}"
        )
        _LOG.warning(
            "coordinator for %s crashed (%s), crash %d of %d",
            pending.request_id,
            why,
            crashes,
            self.options.max_crashes,
        )
        if crashes >= self.options.max_crashes:
            reason = f"coordinator crashed {crashes} times (last: {why})"
            attributes = peek_attributes(pending.record.headers, pending.record.value)
            self.sink.emit(rejection_for(CoordinatorCrashedError(reason), attributes))
            self.state.mark_result(pending.request_id)
            self._done(pending)
            self._on_event("dead_lettered", {"request_id": pending.request_id})
        else:
            self.lanes[pending.lane].buffer.appendleft(pending)

    # -- the loop --------------------------------------------------------------

    def step(self, wait_s: float | None = None) -> None:
        """One round: read, start what may start, wait briefly for exits."""
        self._fill()
        self._start_ready()
        timeout = self.options.idle_wait_s if wait_s is None else wait_s
        readable, _, _ = select.select([self.spawner.fileno()], [], [], timeout)
        if readable:
            for ended in self.spawner.exits():
                self._on_exit(ended)

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until ``should_stop()``; then let running coordinators finish."""
        while not should_stop():
            self.step()
        deadline = time.monotonic() + 30
        while self.running and time.monotonic() < deadline:
            for ended in self.spawner.exits(0.1):
                self._on_exit(ended)
