"""The dispatcher: serves the priority lanes and hands requests to coordinators.

What it promises, on the embedded log and on Kafka alike:

- **priority without starvation**: lanes are picked by smooth weighted
  round-robin (high 8, normal 3, low 1 by default), so a high request starts
  ahead of any low backlog, yet low still gets its share;
- **order per partition key**: two requests with the same key (one device's
  tasks) never run at once, and start in log order;
- **caps**: at most ``max_coordinators`` requests running at once, and at
  most ``per_task_cap`` of one task type;
- **fair shares between task types**: inside a lane, the next request to
  start is of the task type furthest below its weighted share of the
  coordinators running (``task_weights``, 1 each by default), so a rollout of
  thousands of requests cannot hold every coordinator while a request of
  another type waits behind it;
- **serving, fairly**: in ``serve`` mode a coordinator that finished a request
  is handed the next one of its task type, if the lanes' weighted pick would
  start that one now anyway; otherwise it exits and its slot goes to the pick
  (``strict`` mode: every coordinator exits after one request);
- **at least once, applied once**: a lane's offset is committed only up to
  the last request whose result is durable (the runtime's appender appended
  it before the coordinator said it was done); after a crash the rest is
  delivered again, requests that already have a result are skipped, and
  devices dedupe repeated actions by key;
- **cancels hold everywhere**: every cancel on the control topic is read, from
  its beginning (:class:`~mayfly.runtime.cancels.CancelBook`); a canceled
  request waiting in the lanes never starts (its outcome is a ``canceled``
  rejection, on the results topic), and one running is told so, with its
  grace period, through its coordinator's channel;
- **poison requests end**: a request whose coordinator keeps crashing is
  retried after a backoff, and rejected to the dead-letter topic after
  ``max_crashes`` crashes. Nothing a record holds can stop the dispatcher:
  what it reads of a record is bounded (:func:`~mayfly.events.peek_attributes`),
  and a dead letter that cannot be written is written again as a bare one
  (no copied attributes), or retried later while the log refuses appends.

The decisions themselves (lane pick, commit progress, crash budget) are pure
functions in :mod:`mayfly.runtime.policy`; this module applies them.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import select
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from mayfly.coordinator.sinks import EventLogSink
from mayfly.errors import CoordinatorCrashedError, EventError, RequestCanceledError, SinkError
from mayfly.eventlog import WRITE_SETTLE_S, EventLog, GroupMember, LogRecord, Position
from mayfly.events import Priority, TaskCancel, from_kafka, peek_attributes, rejection_for
from mayfly.exitcodes import ExitCode
from mayfly.runtime.appender import Appender
from mayfly.runtime.cancels import CancelBook
from mayfly.runtime.policy import (
    DEFAULT_WEIGHTS,
    after_crash,
    commit_progress,
    pick_lane,
    position_of,
)
from mayfly.runtime.session import CoordinatorSession
from mayfly.runtime.spawner import CoordinatorExit, Spawner
from mayfly.runtime.state import RuntimeState, request_identity
from mayfly.topics import Topics

__all__ = ["DEFAULT_WEIGHTS", "DispatchEvent", "Dispatcher", "DispatcherOptions"]

_LOG = logging.getLogger("mayfly.runtime.dispatcher")
#: The longest the dispatcher holds off while the log refuses results.
_LOG_BACKOFF_MAX_S = 10.0
#: For how long after a wake-up a round looks again every ``settle_wait_s``.
_SETTLE_FAST_S = 0.008
#: How often the control topic is read for cancels, at most (rounds come every
#: few milliseconds while coordinators run).
_CONTROL_EVERY_S = 0.1
#: Cancels read from the control topic in one go, at most.
_CONTROL_BATCH = 500
#: How long a starting runtime reads the cancels published before it, at most.
_CONTROL_CATCH_UP_S = 10.0


class DispatchEvent(StrEnum):
    """What the dispatcher tells ``on_event`` about."""

    STARTED = "started"
    FINISHED = "finished"
    SKIPPED = "skipped"
    """The request already has a durable result (a redelivery)."""
    DEAD_LETTERED = "dead_lettered"
    CANCELED = "canceled"
    """The request was canceled before it started: it never will."""
    DEFERRED = "deferred"
    """The request's schedule holds it: it starts again when that opens."""


@dataclass(frozen=True)
class DispatcherOptions:
    group: str | None = None
    """The lanes' consumer group; None: the installation's (``PREFIX-dispatcher``)."""
    max_coordinators: int = 8
    per_task_cap: int = 4
    task_weights: dict[str, int] = field(default_factory=dict)
    """Each task type's share of the coordinators inside a lane (others: 1)."""
    weights: dict[Priority, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    max_crashes: int = 3
    crash_backoff_s: float = 0.1
    """First wait before a crashed request starts again; doubles per crash."""
    buffer: int = 64
    """Records read ahead per lane."""
    idle_wait_s: float = 0.01
    """How long a round waits for exits when the log cannot wake it (Kafka)."""
    idle_poll_s: float = 1.0
    """The longest a round waits in the log's poll when the log cannot wake it
    and nothing runs or is due (Kafka: a fetch the broker holds, ended by the
    first record): how soon a stop is seen."""
    settle_wait_s: float = 0.002
    """How soon a round looks again after the log woke it (a commit is visible
    a little after the write that woke it: about its fsync)."""
    woken_wait_s: float = 0.25
    """The longest a round waits when the log wakes it on appends (SQLite): how
    soon a stop is seen, and a safety net for a write it was not told of."""
    setup_budget_s: float = 60.0
    """How long a coordinator may take to say its request's deadline (it
    does once it knows the package); past it, it is killed as hung."""
    deadline_grace_s: float = 30.0
    """How long past its request's deadline a coordinator is left to deliver
    the outcome before it is killed as hung (the request is then retried)."""
    max_log_refusals: int = 12
    """Results of one request the log may refuse while it looks down (taking no
    other result) before each further refusal counts as a crash: about a
    minute of backoff with the defaults."""
    serve: bool = True
    """A coordinator serves further queued requests of its task type (``serve``
    mode); False: one coordinator process per request (``strict`` mode)."""


@dataclass
class _Pending:
    lane: Priority
    record: LogRecord
    request_id: str
    task: str
    key: str
    fairness: str = ""
    """Its fairness key (a site, a tenant): shares inside its task type."""
    refused_at: float | None = None
    """When the log last refused its result (see ``Dispatcher._refused_alone``)."""
    refusals: int = 0
    identity: str = ""
    """What the runtime's state knows the request by: its source and id (two
    publishers may use one id, as Knative's JobSink has it)."""
    not_before: float = 0.0
    """``time.monotonic()`` before which it may not start (a crash's backoff)."""


class _Lane:
    def __init__(self, priority: Priority, topic: str, consumer: GroupMember) -> None:
        self.priority = priority
        self.topic = topic
        self.consumer = consumer  # shared by the lanes: one reader of their topics
        self.buffer: collections.deque[_Pending] = collections.deque()
        self.paused = False
        # Per partition this runtime has (the group gives and takes them): offsets
        # read but not done, the next offset to read, what was committed, and
        # what the member before this one left (records it had finished).
        self.outstanding: dict[int, set[int]] = collections.defaultdict(set)
        self.next_offset: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.before: dict[int, Position] = {}
        self.last_position: dict[int, Position] = {}
        self.revoking: set[int] = set()

    def assign(self, partition: int, position: Position) -> None:
        self.next_offset[partition] = self.committed[partition] = position.offset
        self.before[partition] = self.last_position[partition] = position
        self.outstanding[partition] = set()
        self.revoking.discard(partition)

    def forget(self, partition: int) -> None:
        """No longer this runtime's: nothing of it is started, done or committed here."""
        for of_partition in (self.next_offset, self.committed, self.before, self.last_position):
            of_partition.pop(partition, None)
        self.outstanding.pop(partition, None)
        self.revoking.discard(partition)
        self.drop(partition)

    def drop(self, partition: int) -> None:
        """Take the partition's records out of the buffer (another member runs them)."""
        self.buffer = collections.deque(p for p in self.buffer if p.record.partition != partition)

    def owns(self, record: LogRecord) -> bool:
        return record.partition in self.next_offset and record.partition not in self.revoking

    def hold(self, full: bool) -> None:
        """Pause the lane's topic while its buffer is full, resume it after: the
        consumer reads every lane, and this one's read-ahead stays bounded."""
        if full != self.paused:
            (self.consumer.pause if full else self.consumer.resume)(self.topic)
            self.paused = full

    def read(self, record: LogRecord) -> None:
        self.outstanding[record.partition].add(record.offset)
        self.next_offset[record.partition] = record.offset + 1

    def done_before(self, record: LogRecord) -> bool:
        """Whether the member before this one finished the record."""
        before = self.before.get(record.partition)
        return before is not None and before.is_done(record.offset)

    def done(self, record: LogRecord, *, commit: bool = True) -> None:
        if record.partition not in self.next_offset:
            return  # taken from this runtime meanwhile: its new member decides
        self.outstanding[record.partition].discard(record.offset)
        if commit:
            self.commit_progress()

    def position(self, partition: int) -> Position:
        return position_of(
            self.next_offset[partition], self.outstanding[partition], self.before.get(partition)
        )

    def commit_progress(self) -> None:
        """Commit, per partition, up to the first record not yet done; where other
        runtimes may take partitions over, with the records done after it."""
        if self.consumer.shared:
            changed = {}
            for partition in self.next_offset:
                position = self.position(partition)
                if position != self.last_position.get(partition):
                    changed[partition] = position
            if changed:
                self.consumer.commit_positions({self.topic: changed})
                self.last_position.update(changed)
            return
        changes = commit_progress(self.next_offset, self.outstanding, self.committed)
        if changes:
            self.consumer.commit({self.topic: changes})
            self.committed.update(changes)


def _answer_append(
    session: CoordinatorSession, asked_at: float, outcome: bool, why: str | None
) -> None:
    # From the appender's thread: plain assignments. The time the runtime held
    # the records is not the coordinator's: its deadline moves on by as much,
    # or a slow log would have it killed between "appended" and its "done".
    session.due += time.monotonic() - asked_at
    if outcome and why is None:
        session.outcome_durable = True
    session.appending = False
    session.send(("appended", why))


class Dispatcher:
    """Single-threaded loop: poll lanes, start coordinators, reap exits, commit."""

    def __init__(
        self,
        log: EventLog,
        spawner: Spawner,
        state: RuntimeState,
        options: DispatcherOptions | None = None,
        on_event: Callable[[DispatchEvent, dict[str, object]], None] | None = None,
        topics: Topics | None = None,
    ) -> None:
        topics = topics or Topics()
        self.options = options or DispatcherOptions()
        self.spawner = spawner
        self.state = state
        self.log = log
        self.sink = EventLogSink(log, topics)
        # One member of the group for the three lanes: on Kafka one fetch to wait
        # in for a request of any priority; which lane starts first stays _pick's
        # choice. Partitions come (and, with other runtimes, go) as the group says.
        lane_topics = {p: topics.lane(p) for p in Priority}
        self._consumer = log.member_of(
            self.options.group or topics.dispatcher_group,
            list(lane_topics.values()),
            _Membership(self),
        )
        self.lanes = {p: _Lane(p, topic, self._consumer) for p, topic in lane_topics.items()}
        self._lane_of = {topic: p for p, topic in lane_topics.items()}
        self.running: dict[str, _Pending] = {}
        """Per coordinator (session token), the request it runs now."""
        self.sessions: dict[str, CoordinatorSession] = {}
        """Every coordinator process alive, serving or exiting."""
        self.appender = Appender(log)
        self._stopping = False
        self._credits: dict[Priority, int] = {}
        self._tokens = itertools.count()
        self._on_event = on_event or (lambda _kind, _info: None)
        # Idle, the loop sleeps in select() until a write to the log or an exit,
        # instead of asking every lane every 10 ms (most of an idle runtime's CPU).
        self._waker = log.waker()
        self._written_at = -math.inf
        self._log_backoff_s = 0.0
        self._log_down_until = -math.inf
        self._last_durable_at = -math.inf
        self._closing = False
        self._warm_parent_lost = False
        # Every runtime reads every cancel: a group of its own, from the start,
        # committing nothing (a restart reads them all again).
        self._cancels = CancelBook()
        self._control = log.consumer(
            f"{topics.dispatcher_group}-control-{uuid.uuid4().hex[:12]}", topics.control
        )
        self._control_due = -math.inf
        self._control_caught_up = False

    # -- reading ---------------------------------------------------------------

    def _fill(self, timeout_s: float = 0.0) -> bool:
        """Read into the lanes' buffers, waiting up to ``timeout_s`` for a record;
        whether it asked the log (not when every lane is full)."""
        rooms = []
        # A lane is held until a quarter of its buffer is free: one nearly full
        # would otherwise cap every poll (of any lane) at its few free places.
        low_water = max(1, self.options.buffer // 4)
        for lane in self.lanes.values():
            room = self.options.buffer - len(lane.buffer)
            lane.hold(room < low_water)
            if room >= low_water:
                rooms.append(room)
        if not rooms:
            return False
        # No more than the lane with least room takes: a poll may bring any lane's.
        passed: set[_Lane] = set()
        for record in self._consumer.poll(min(rooms), timeout_s):
            lane = self.lanes[self._lane_of[record.topic]]
            if not lane.owns(record):
                continue  # given up while it was fetched: its new member reads it
            attrs = peek_attributes(record.headers, record.value)
            where = f"{record.topic}/{record.partition}@{record.offset}"
            request_id = str(attrs.get("id") or where)
            if lane.done_before(record):
                # Finished by the runtime that had the partition before.
                lane.read(record)
                lane.done(record, commit=False)
                passed.add(lane)
                self._on_event(DispatchEvent.SKIPPED, {"request_id": request_id})
                continue
            pending = _Pending(
                lane=lane.priority,
                record=record,
                request_id=request_id,
                identity=request_identity(str(attrs.get("source") or ""), request_id),
                task=str(attrs.get("tasktype") or "?"),
                fairness=str(attrs.get("fairnesskey") or ""),
                key=str(
                    attrs.get("partitionkey") or (record.key or b"").decode("utf-8", "replace")
                ),
            )
            lane.read(record)
            lane.buffer.append(pending)
        for lane in passed:
            lane.commit_progress()
        return True

    # -- choosing --------------------------------------------------------------

    def _startable(self, lane: _Lane) -> _Pending | None:
        """The record of the lane to start now, keeping key order: of the first
        one that may start of each task type and fairness key, that of the type
        furthest below its share of the coordinators running (its weight), and
        in it of the key with the fewest running; the earliest on a tie. So a
        rollout of thousands of requests of one type (or one site, one tenant)
        takes its share, and a request of another queued behind them starts
        next."""
        running_keys = {p.key for p in self.running.values()}
        per_task = collections.Counter(p.task for p in self.running.values())
        per_key = collections.Counter((p.task, p.fairness) for p in self.running.values())
        weights = self.options.task_weights
        blocked: set[str] = set()
        seen: set[tuple[str, str]] = set()
        best: _Pending | None = None
        best_share = (math.inf, math.inf)
        now = time.monotonic()
        for pending in lane.buffer:
            if pending.key in running_keys or pending.key in blocked or pending.not_before > now:
                blocked.add(pending.key)
                continue
            group = (pending.task, pending.fairness)
            if per_task[pending.task] >= self.options.per_task_cap or group in seen:
                blocked.add(pending.key)  # what its key holds later waits behind it
                continue
            seen.add(group)
            blocked.add(pending.key)
            share = (per_task[pending.task] / weights.get(pending.task, 1), float(per_key[group]))
            if share < best_share:
                best, best_share = pending, share
            if share == (0.0, 0.0):
                break  # none of its type running: nothing comes before it
        return best

    def _pick(self) -> _Pending | None:
        startable = {
            lane.priority: p
            for lane in self.lanes.values()
            if (p := self._startable(lane)) is not None
        }
        chosen = pick_lane(list(startable), self._credits, self.options.weights)
        if chosen is None:
            return None
        pending = startable[chosen]
        self.lanes[chosen].buffer.remove(pending)
        return pending

    # -- starting and finishing -----------------------------------------------

    def _done(self, pending: _Pending) -> None:
        self.lanes[pending.lane].done(pending.record)

    def _start_ready(self) -> None:
        while len(self.running) < self.options.max_coordinators and not self._warm_parent_lost:
            pending = self._next_startable()
            if pending is None:
                return
            self._launch(pending)

    def _next_startable(self) -> _Pending | None:
        """The pick to start next, passing over (and finishing) redeliveries;
        none while the log is backed off (see :meth:`_log_refused`)."""
        if time.monotonic() < self._log_down_until:
            return None
        while (pending := self._pick()) is not None:
            if self.state.has_result(pending.identity):
                self._on_event(DispatchEvent.SKIPPED, {"request_id": pending.request_id})
                self._done(pending)
            elif (cancel := self._cancels.of(pending.request_id)) is not None:
                self._end_canceled(pending, cancel)
            else:
                return pending
        return None

    # -- cancels ---------------------------------------------------------------

    def _catch_up_control(self) -> None:
        """Read the cancels already published, to where the control topic ends
        now, before anything starts: a request canceled while no runtime ran
        must not start (a Kafka consumer's first polls return nothing while
        its first fetch is under way). Bounded: a log that does not answer
        delays cancels, not the runtime."""
        self._control_caught_up = True
        deadline = time.monotonic() + _CONTROL_CATCH_UP_S
        try:
            left = {p: end for p, end in self._control.end_offsets().items() if end > 0}
            while left and time.monotonic() < deadline:
                records = self._control.poll(_CONTROL_BATCH, 0.2)
                for record in records:
                    if record.offset + 1 >= left.get(record.partition, 0):
                        left.pop(record.partition, None)
                self._take_cancels(records)
        except Exception as exc:  # the lanes' read says so too
            _LOG.warning("cancels not read: %s", exc)
            return
        if left:
            _LOG.warning("cancels not all read within %g s; reading on", _CONTROL_CATCH_UP_S)

    def _read_control(self) -> None:
        """Take in the cancels published since the last look (at most every
        ``_CONTROL_EVERY_S``) and act on each new one."""
        if not self._control_caught_up:
            self._catch_up_control()
        now = time.monotonic()
        if now < self._control_due:
            return
        self._control_due = now + _CONTROL_EVERY_S
        try:
            records = self._control.poll(_CONTROL_BATCH, 0.0)
        except Exception as exc:  # the lanes' read says so too; cancels wait
            _LOG.warning("cancels not read: %s", exc)
            return
        self._take_cancels(records)

    def _take_cancels(self, records: list[LogRecord]) -> None:
        for record in records:
            try:
                event = from_kafka(record.headers, record.key, record.value)
            except EventError as exc:
                where = f"{record.topic}/{record.partition}@{record.offset}"
                _LOG.warning("control record %s ignored: %s", where, exc)
                continue
            if isinstance(event, TaskCancel) and self._cancels.add(event):
                self._apply_cancel(event)

    def _apply_cancel(self, cancel: TaskCancel) -> None:
        """End what of the request waits here; tell its coordinators, if it runs."""
        for lane in self.lanes.values():
            for pending in [p for p in lane.buffer if self._cancels.of(p.request_id) is cancel]:
                lane.buffer.remove(pending)
                if self.state.has_result(pending.identity):
                    self._done(pending)  # ended already (a redelivery)
                else:
                    self._end_canceled(pending, cancel)
        for token, pending in self.running.items():
            if self._cancels.of(pending.request_id) is cancel:
                record = pending.record
                where = (record.topic, record.partition, record.offset)
                aborted = cancel.reason if cancel.abort else None
                if self.sessions[token].send(("cancel", where, cancel.grace_s, aborted)):
                    _LOG.info(
                        "%s canceled while running: its coordinator stops it (grace %g s)",
                        pending.request_id,
                        cancel.grace_s,
                    )

    def _end_canceled(self, pending: _Pending, cancel: TaskCancel) -> None:
        """The outcome of a request canceled before it started: a ``canceled``
        rejection on the results topic. While the log refuses it, the request
        waits, and this is tried again."""
        why = "canceled before it started" + (f": {cancel.reason}" if cancel.reason else "")
        record = pending.record
        try:
            self.sink.emit(
                rejection_for(
                    RequestCanceledError(why), peek_attributes(record.headers, record.value)
                )
            )
        except Exception as exc:
            _LOG.warning("the cancel of %s not recorded yet: %s", pending.request_id, exc)
            pending.not_before = time.monotonic() + self.options.crash_backoff_s * 10
            self._requeue(pending)
            return
        self.state.mark_result(pending.identity)
        self._done(pending)
        self._on_event(DispatchEvent.CANCELED, {"request_id": pending.request_id})

    def _launch(self, pending: _Pending) -> None:
        token = f"c{next(self._tokens)}"
        session = self.spawner.spawn(token, pending.record, datetime.now(UTC))
        session.task = pending.task
        session.due = time.monotonic() + self.options.setup_budget_s
        self.running[token] = pending
        self.sessions[token] = session
        self._started(pending, token)

    def _started(self, pending: _Pending, token: str) -> None:
        self._on_event(
            DispatchEvent.STARTED,
            {
                "request_id": pending.request_id,
                "priority": pending.lane.value,
                "task": pending.task,
                "coordinator": token,
            },
        )

    # -- what coordinators say -------------------------------------------------

    def _serve(self, session: CoordinatorSession) -> None:
        for message in session.receive():
            kind = message[0]
            if kind == "pid":
                session.watch(int(message[1]))
            elif kind == "deadline":
                grace = self.options.deadline_grace_s
                session.due = time.monotonic() + float(message[1]) + grace
            elif kind == "append":
                # Not killed as hung while the runtime's own append is under way.
                session.appending = True
                outcome = len(message) > 2 and bool(message[2])
                self.appender.submit(
                    message[1],
                    functools.partial(_answer_append, session, time.monotonic(), outcome),
                )
            elif kind == "defer":
                session.defer_until = float(message[1])
            elif kind == "done":
                self._on_done(session, int(message[1]))
            elif kind == "declined":
                pending = self.running.pop(session.token, None)
                if pending is not None:  # started afresh, in a coordinator of its digest
                    self._requeue(pending)
                session.send(("exit",))
            elif kind == "eof":
                # Its exit, with the status, comes from the warm parent.
                session.open = False

    def _on_done(self, session: CoordinatorSession, code: int) -> None:
        pending = self.running.pop(session.token, None)
        session.outcome_durable = False  # of that request; the next one starts afresh
        until, session.defer_until = session.defer_until, None
        if pending is not None and code == ExitCode.DEFERRED and until is not None:
            self._defer(pending, until)
        elif pending is not None:
            self._finished(pending, code, f"exit code {code}")
        if code not in ExitCode.durable_codes() or not self._hand_over(session):
            session.send(("exit",))

    def _hand_over(self, session: CoordinatorSession) -> bool:
        """Give a coordinator that finished its request the next one of its task
        type, when the weighted pick would start that one now anyway. Otherwise
        the pick (of another type) starts in a new coordinator, in the slot this
        one frees by exiting."""
        if not self.options.serve or self._stopping or session.killed or self._warm_parent_lost:
            return False
        pending = self._next_startable()
        if pending is None:
            return False
        if pending.task != session.task:
            self._launch(pending)
            return False
        if not session.send(("run", pending.record, datetime.now(UTC))):
            self._requeue(pending)
            return False
        self.running[session.token] = pending
        session.due = time.monotonic() + self.options.setup_budget_s
        self._started(pending, session.token)
        return True

    def _on_exit(self, ended: CoordinatorExit) -> None:
        session = self.sessions.pop(ended.token, None)
        if session is None:
            return
        self._serve(session)  # what it said before it went
        session.close()
        pending = self.running.pop(ended.token, None)
        if pending is None:
            return  # it said "done" for everything it ran
        why = f"signal {-ended.returncode}" if ended.returncode < 0 else "no outcome"
        if ended.returncode > 0:
            why = f"exit code {ended.returncode}, no outcome"
        if session.killed:
            why = "killed: it ran past its request's deadline"
        if session.outcome_durable:
            # Its outcome was appended whole before it died (before its "done"):
            # the request is done; running it again would give it two outcomes.
            _LOG.warning("%s: its coordinator died (%s) after its outcome", pending.request_id, why)
            self._finished(pending, int(ExitCode.OK), why)
            return
        self._finished(pending, int(ExitCode.INTERNAL), why)

    def _finished(self, pending: _Pending, code: int, why: str) -> None:
        if code in ExitCode.durable_codes():
            self._log_backoff_s = 0.0
            self._last_durable_at = time.monotonic()
            self.state.mark_result(pending.identity)
            self._done(pending)
            self._on_event(DispatchEvent.FINISHED, {"request_id": pending.request_id, "code": code})
            return
        if code == ExitCode.UNDELIVERED and not self._refused_alone(pending):
            self._log_refused(pending, why)
            return
        crashes = self.state.add_crash(pending.identity)
        _LOG.warning(
            "coordinator for %s crashed (%s), crash %d of %d",
            pending.request_id,
            why,
            crashes,
            self.options.max_crashes,
        )
        decision = after_crash(
            crashes, self.options.max_crashes, base_s=self.options.crash_backoff_s
        )
        if decision.give_up and self._dead_letter(pending, crashes, why):
            self.state.mark_result(pending.identity)
            self._done(pending)
            self._on_event(DispatchEvent.DEAD_LETTERED, {"request_id": pending.request_id})
            return
        retry_in_s = decision.retry_in_s if not decision.give_up else self._give_up_retry_s()
        pending.not_before = time.monotonic() + retry_in_s
        self._requeue(pending)

    def _defer(self, pending: _Pending, until: float) -> None:
        """Hold a request its schedule closes until ``until`` (a Unix time): its
        record stays uncommitted, so a runtime started meanwhile reads it again
        and its coordinator defers it again; requests of its key wait behind it."""
        wait_s = max(0.0, until - time.time())
        _LOG.info("%s: held by its schedule for %.0f s", pending.request_id, wait_s)
        pending.not_before = time.monotonic() + wait_s
        self._requeue(pending)
        self._on_event(DispatchEvent.DEFERRED, {"request_id": pending.request_id, "until": until})

    def _refused_alone(self, pending: _Pending) -> bool:
        """Whether this result is what the log refuses (one too large for the
        topic, say), which waiting will not change: it was refused again after
        the log took others since, or more than ``max_log_refusals`` times.
        Then it counts as a crash, so it ends."""
        refused_before, pending.refused_at = pending.refused_at, time.monotonic()
        pending.refusals += 1
        if pending.refusals > self.options.max_log_refusals:
            return True
        return refused_before is not None and self._last_durable_at > refused_before

    def _log_refused(self, pending: _Pending, why: str) -> None:
        """The request ran, but the log would not take its result (a broker down,
        a full disk): the log's fault, not the request's, so no crash is counted
        (counting it dead-lettered requests whose devices had acted). It runs
        again, and nothing starts, after a backoff that doubles while the log
        keeps refusing."""
        self._log_backoff_s = min(
            max(self._log_backoff_s * 2, self.options.crash_backoff_s), _LOG_BACKOFF_MAX_S
        )
        self._log_down_until = time.monotonic() + self._log_backoff_s
        _LOG.warning(
            "the result of %s was not made durable (%s); starting nothing for %.1f s",
            pending.request_id,
            why,
            self._log_backoff_s,
        )
        pending.not_before = self._log_down_until
        self._requeue(pending)

    def _requeue(self, pending: _Pending) -> None:
        """Put a request back at the front of its lane, unless its partition is
        leaving this runtime (then its next member runs it)."""
        lane = self.lanes[pending.lane]
        if lane.owns(pending.record):
            lane.buffer.appendleft(pending)

    def _give_up_retry_s(self) -> float:
        # The log refused the dead letter: try again (the request runs once
        # more first) after the longest crash backoff, not in a tight loop.
        return self.options.crash_backoff_s * float(2 ** max(self.options.max_crashes - 1, 0))

    def _dead_letter(self, pending: _Pending, crashes: int, why: str) -> bool:
        """Reject a request whose coordinator kept crashing; never raises.

        Returns:
            Whether the rejection is durable (else the log refused it for now).
        """
        error = CoordinatorCrashedError(f"coordinator crashed {crashes} times (last: {why})")
        record = pending.record
        try:
            self.sink.emit(rejection_for(error, peek_attributes(record.headers, record.value)))
            return True
        except Exception:
            _LOG.exception(
                "dead letter of %s (%s/%d@%d) not written; writing a bare one",
                pending.request_id,
                record.topic,
                record.partition,
                record.offset,
            )
        # What is certain to encode: the request id and the reason, nothing copied.
        bare = {"id": pending.request_id, "partitionkey": pending.key}
        try:
            self.sink.emit(rejection_for(error, bare))
            return True
        except SinkError as exc:
            _LOG.error("dead letter of %s not written, will retry: %s", pending.request_id, exc)
            return False
        except Exception:
            # Not the log: nothing a retry would change. Said loudly, and passed.
            _LOG.exception("dead letter of %s cannot be written; skipped", pending.request_id)
            return True

    # -- the loop --------------------------------------------------------------

    def step(self, wait_s: float | None = None) -> None:
        """One round: read, start what may start, wait for exits (and, where the
        log can say so, for appends; where it cannot, in its poll while nothing runs)."""
        if self._warm_parent_lost:
            self.spawner.restart()
            self._warm_parent_lost = False
        if self._waker is not None and self._waker.drain():  # before reading: see Waker
            self._written_at = time.monotonic()
        # A log that cannot wake the loop is waited in instead, while nothing runs
        # (no exit to reap) and nothing is due: its poll ends at the first record.
        hold = 0.0
        if wait_s is None and self._waker is None and not self.running:
            hold = self._wait_s()
        waited = self._fill(hold) and hold > 0
        self._read_control()
        self._start_ready()
        self._kill_overdue()
        if wait_s is None:  # having waited in the poll, only look for exits
            wait_s = 0.0 if waited else self._wait_s()
        self._wait(wait_s)

    def _kill_overdue(self) -> None:
        """End a coordinator stuck past its request's deadline (a hostile params
        value against a backtracking pattern, a bug): its exit is then a crash,
        retried and at last dead-lettered like any other."""
        now = time.monotonic()
        for token, pending in list(self.running.items()):
            session = self.sessions[token]
            if session.pidfd is None or session.killed or session.due > now:
                continue
            # What it said since the last wait first: an append asked, a "done".
            self._serve(session)
            if self.running.get(token) is not pending or session.due > now:
                continue
            if session.appending:
                continue  # waiting on the runtime's log, not stuck on its own
            _LOG.warning(
                "coordinator %d for %s ran past its deadline; killing it",
                session.pid,
                pending.request_id,
            )
            session.kill()

    def _wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for coordinators' messages, exits (and appends,
        where the log can say), and act on what came."""
        waits: list[int | CoordinatorSession] = []
        if not self._warm_parent_lost:  # its pipe stays readable until the restart
            waits.append(self.spawner.fileno())
        waits += [session for session in self.sessions.values() if session.open]
        if self._waker is not None:
            waits.append(self._waker.fileno())
        readable, _, _ = select.select(waits, [], [], timeout)
        for ready in readable:
            if isinstance(ready, CoordinatorSession):
                self._serve(ready)
        if not self._warm_parent_lost and self.spawner.fileno() in readable:
            try:
                ended_ones = self.spawner.exits()
            except RuntimeError:
                self._warm_parent_died()
                return
            for ended in ended_ones:
                self._on_exit(ended)

    def _warm_parent_died(self) -> None:
        """Start a new warm parent; what its coordinators ran starts again.

        They died with it (PR_SET_PDEATHSIG), their task processes with them,
        none of it the requests' doing: no crash is counted.
        """
        _LOG.error(
            "the warm parent died with %d coordinators; starting a new one", len(self.sessions)
        )
        # Nothing is started or handed over until the new one runs, and that is
        # started from the loop (step), never from inside a rebalance's drain,
        # which runs on the log client's I/O thread.
        self._warm_parent_lost = True
        for token, session in list(self.sessions.items()):
            self._serve(session)  # a "done" already said is kept, not run again
            session.close()
            pending = self.running.pop(token, None)
            if pending is not None:
                self._requeue(pending)
        self.sessions.clear()

    def _wait_s(self) -> float:
        if self._waker is None:
            if self.running:
                return self.options.idle_wait_s
            # Nothing to reap: until a buffered record is due (0 for one that is
            # startable now), else as long as a stop may go unseen.
            now = time.monotonic()
            waits = [max(0.0, p.not_before - now) for ln in self.lanes.values() for p in ln.buffer]
            return min([self.options.idle_poll_s, *waits])
        since_write = time.monotonic() - self._written_at
        if since_write < WRITE_SETTLE_S:
            # A write can wake us before its records are visible (SQLite: the
            # WAL's fsync comes between): look again soon, for a moment, then
            # sleep on the waker. Most commits show within a few milliseconds.
            fast = since_write < _SETTLE_FAST_S
            return self.options.settle_wait_s if fast else self.options.idle_wait_s
        wait = self.options.woken_wait_s
        # A crashed request waiting out its backoff is due at a time, not on a write.
        due = [p.not_before for lane in self.lanes.values() for p in lane.buffer if p.not_before]
        if due:
            wait = min(wait, max(0.0, min(due) - time.monotonic()))
        return wait

    def close(self) -> None:
        """Finish the appends under way; release the lanes' consumer and the
        log's wake-up."""
        self._closing = True  # a revoke on close drains nothing: sessions are closed
        self.appender.close()
        for session in self.sessions.values():
            session.close()
        self._consumer.close()
        self._control.close()
        if self._waker is not None:
            self._waker.close()
            self._waker = None

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve until ``should_stop()``; then let running coordinators finish."""
        while not should_stop():
            self.step()
        self._stopping = True  # no more hand-overs: serving coordinators exit
        deadline = time.monotonic() + 30
        while self.sessions and time.monotonic() < deadline:
            self._wait(0.1)


class _Membership:
    """The dispatcher's side of its lanes' group (:class:`~mayfly.eventlog.Rebalance`).

    Called from inside the lanes' ``poll``: a partition that leaves is drained
    first (nothing more of it starts; what runs of it finishes and is
    answered), so it is never run here and by its next runtime at once, and
    one key's requests stay in order across runtimes.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def _lane(self, topic: str) -> _Lane:
        return self._dispatcher.lanes[self._dispatcher._lane_of[topic]]

    def assigned(self, topic: str, positions: Mapping[int, Position]) -> None:
        lane = self._lane(topic)
        for partition, position in positions.items():
            lane.assign(partition, position)
        _LOG.info("serving %s partitions %s", topic, sorted(positions))

    def revoking(self, topic: str, partitions: Collection[int]) -> None:
        lane = self._lane(topic)
        for partition in partitions:
            if partition in lane.next_offset:
                lane.revoking.add(partition)
                lane.drop(partition)
        _LOG.info("handing %s partitions %s to another runtime", topic, sorted(partitions))

    def drain(self, wait_s: float) -> bool:
        dispatcher = self._dispatcher
        if dispatcher._closing or not self._draining():
            return True  # closing: what still runs stays pending for the next member
        dispatcher._wait(wait_s)  # answers and reaps; starts nothing of what leaves
        return not self._draining()

    def _draining(self) -> bool:
        dispatcher = self._dispatcher
        return any(
            p.record.partition in dispatcher.lanes[p.lane].revoking
            for p in dispatcher.running.values()
        )

    def positions(self) -> Mapping[str, Mapping[int, Position]]:
        positions: dict[str, dict[int, Position]] = {}
        for lane in self._dispatcher.lanes.values():
            for partition in sorted(lane.revoking):
                positions.setdefault(lane.topic, {})[partition] = lane.position(partition)
                lane.forget(partition)
        return positions

    def lost(self, topic: str, partitions: Collection[int]) -> None:
        lane = self._lane(topic)
        for partition in partitions:
            lane.forget(partition)
        _LOG.warning(
            "%s partitions %s were taken from this runtime (no heartbeat in time); "
            "what runs of them may run again elsewhere",
            topic,
            sorted(partitions),
        )
