"""The channel between the runtime and one coordinator process it started.

A coordinator forked by the local runtime does not open the event log to
deliver its result: it hands the encoded records to the runtime over this
channel, and the runtime's long-lived appender (:mod:`mayfly.runtime.appender`)
appends them, in batches with other coordinators' results, before it answers.
The coordinator returns from its sink only after that answer, so "the result
is durable before the request is done" holds as before; what changed is who
holds the connection to the log (one producer for the runtime, not one per
coordinator: on Kafka a new producer cost a coordinator about 40 ms of CPU).

Then the coordinator says it is done with the request's exit code and asks for
more. The dispatcher answers with the next request of the same task type for
it to serve (the default, ``serve`` mode) or tells it to exit (``strict``
mode: one coordinator process per request, or nothing of its kind waiting).
Each request's package code still runs in fresh task processes.

Both ends are Mayfly's own processes (package code runs in task processes,
which never inherit this descriptor), so messages are pickled tuples over a
Unix stream socket (:class:`multiprocessing.connection.Connection`):

coordinator -> runtime
    ``("pid", pid)``: first, so the runtime can end a coordinator that hangs.
    ``("deadline", seconds)``: the request handed over (or forked for) ends
    within ``seconds`` (its package's ``timeout_s``); past it and a grace the
    runtime kills the coordinator, whatever it is stuck in (a backtracking
    params pattern, a bug).
    ``("append", [(topic, key, value, headers), ...], outcome)``: make these
    durable; ``outcome``: they end the request's outcome (its result or last part).
    ``("defer", epoch_s)``: before a ``done`` with code DEFERRED: the request's
    schedule holds it until then (a Unix time); the runtime keeps its record,
    uncommitted, and starts it again no earlier.
    ``("done", code)``: the request ended with this exit code.
    ``("declined",)``: the request handed over needs another package
    digest; this coordinator exits and the request starts in a new one.
runtime -> coordinator
    ``("appended", None)`` or ``("appended", why)``: durable, or refused.
    ``("run", record, dequeued_at)``: serve this request next.
    ``("exit",)``: nothing more for this coordinator.
    ``("cancel", (topic, partition, offset), grace_s, aborted)``: the request of that
    record is canceled (``mayfly cancel``); at any time, in between the others,
    and for a request the coordinator may have finished already (then nothing
    happens). ``aborted`` is None, or why the rollout aborted when the cancel
    is its abort (from another of its shards). The coordinator's run loop
    watches the channel for it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Sequence
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any, Protocol

from mayfly.coordinator.sinks import outcome_records
from mayfly.errors import SinkError
from mayfly.eventlog import EventLog, Headers, LogRecord
from mayfly.events import MayflyEvent, TaskCompleted, TaskRejected
from mayfly.topics import Topics

__all__ = [
    "Append",
    "Appends",
    "CoordinatorSession",
    "DirectLink",
    "RequestControl",
    "RuntimeLink",
    "RuntimeSink",
    "answer_blocking",
]

#: One record to append: topic, key, value, headers.
Append = tuple[str, bytes | None, bytes, Headers]


class CoordinatorSession:
    """The runtime's end of one coordinator's channel, and what the dispatcher
    keeps of that coordinator."""

    def __init__(self, token: str, conn: Connection) -> None:
        self.token = token
        self.conn = conn
        self.task: str | None = None
        """The task type it serves (of the request it was forked for)."""
        self.pid: int | None = None
        self.pidfd: int | None = None
        """Opened when it says its pid: a kill through it cannot reach a reused pid."""
        self.due = math.inf
        """``time.monotonic()`` past which its request has overrun: it is killed."""
        self.killed = False
        self.appending = False
        """The appender holds its records: it waits on the runtime, not stuck."""
        self.outcome_durable = False
        """The outcome of the request it runs is durable (appended whole): if it
        dies before it says "done", the request is done all the same."""
        self.defer_until: float | None = None
        """The Unix time its request's schedule holds it until (said before "done")."""
        self.open = True
        """Its end is open (not yet at EOF): the dispatcher selects on it."""
        # The appender answers appends from its thread while the dispatcher's
        # thread answers "done": never interleaved on the wire.
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.conn.fileno()

    def receive(self) -> list[tuple[Any, ...]]:
        """Every message waiting now (without blocking); ``[("eof",)]`` last when the
        coordinator closed its end."""
        found: list[tuple[Any, ...]] = []
        try:
            while self.conn.poll(0):
                found.append(self.conn.recv())
        except (EOFError, OSError):
            found.append(("eof",))
        return found

    def send(self, message: tuple[Any, ...]) -> bool:
        """Send one message; False when the coordinator is gone."""
        with self._send_lock:
            if self.conn.closed:
                return False
            try:
                self.conn.send(message)
            except (OSError, ValueError):
                return False
        return True

    def watch(self, pid: int) -> None:
        """Keep the coordinator's pid, and a pidfd of it while it lives."""
        if self.pidfd is None:
            self.pid = pid
            with contextlib.suppress(ProcessLookupError):  # gone: its exit is on its way
                self.pidfd = os.pidfd_open(pid)

    def kill(self) -> None:
        """SIGKILL the coordinator, through its pidfd."""
        self.killed = True
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        # Under the lock: the appender may be answering on it from its thread.
        with self._send_lock:
            self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


#: Where a request's record is: what a cancel names the request it stops by.
RecordAt = tuple[str, int, int]


class RuntimeLink:
    """The coordinator's end: appends through the runtime, and asks it for more."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._cancels: dict[RecordAt, float] = {}
        """Grace periods of the cancels heard, by the record they stop."""
        self._aborts: dict[RecordAt, str] = {}
        """Of those, the ones that are a rollout's abort: why it aborted."""
        self._held: list[tuple[Any, ...]] = []
        """Messages a :meth:`read` took in that were not cancels."""
        self._gone = False

    def fileno(self) -> int | None:
        """The channel, to wait on for a cancel; None once the runtime is gone."""
        return None if self._gone else self.conn.fileno()

    def read(self) -> None:
        """Take in the messages that arrived, without blocking (cancels, while a
        request runs)."""
        try:
            while not self._gone and self.conn.poll(0):
                self._take(self.conn.recv())
        except (EOFError, OSError):
            self._gone = True

    def cancel_of(self, where: RecordAt) -> float | None:
        """The grace period of a cancel heard for the request at ``where``."""
        return self._cancels.get(where)

    def abort_of(self, where: RecordAt) -> str | None:
        """Why the rollout aborted, when the cancel heard for ``where`` is that."""
        return self._aborts.get(where)

    def _take(self, message: tuple[Any, ...]) -> None:
        if message[0] == "cancel":
            where, grace = message[1], message[2]
            at = (str(where[0]), int(where[1]), int(where[2]))
            self._cancels[at] = float(grace)
            if len(message) > 3 and message[3] is not None:
                self._aborts[at] = str(message[3])
        else:
            self._held.append(message)

    def _recv(self) -> tuple[Any, ...]:
        """The next message that is not a cancel (those are kept)."""
        while not self._held:
            self._take(self.conn.recv())
        return self._held.pop(0)

    def hello(self) -> None:
        """Tell the runtime this process's pid (its watchdog kills by pid)."""
        self.conn.send(("pid", os.getpid()))

    def deadline(self, seconds: float) -> None:
        """The request now running ends within ``seconds``, or is killed."""
        with contextlib.suppress(OSError):
            self.conn.send(("deadline", float(seconds)))

    def append(self, records: Sequence[Append], *, outcome: bool = False) -> None:
        """Hand records to the runtime; return once it made them durable.
        ``outcome``: they end the request's outcome (its result, or its last
        part): once durable, the request is done whatever becomes of this process.

        Raises:
            SinkError: the runtime's log refused them, or the runtime is gone.
        """
        try:
            batch = [(t, k, v, tuple(h)) for t, k, v, h in records]
            self.conn.send(("append", batch, outcome))
            answer = self._recv()
        except (EOFError, OSError) as exc:
            raise SinkError(f"the runtime did not take the result: {exc or 'it is gone'}") from exc
        if answer[0] != "appended":
            raise SinkError(f"the runtime answered {answer[0]!r} to an append")
        if answer[1] is not None:
            raise SinkError(str(answer[1]))

    def defer(self, until: datetime) -> None:
        """The request now ending is held by its schedule until ``until``."""
        with contextlib.suppress(OSError):
            self.conn.send(("defer", until.timestamp()))

    def done(self, code: int) -> tuple[LogRecord, datetime] | None:
        """Say the request ended with ``code``; the next request to serve, or None
        to exit."""
        return self._next(("done", code))

    def decline(self) -> None:
        """Give back the request just handed over (this process exits next)."""
        self._next(("declined",))

    def _next(self, message: tuple[Any, ...]) -> tuple[LogRecord, datetime] | None:
        # The request is over: a cancel for it from now on changes nothing, and
        # the runtime names the next one by its own record.
        self._cancels.clear()
        self._aborts.clear()
        try:
            self.conn.send(message)
            answer = self._recv()
        except (EOFError, OSError):
            return None  # the runtime is gone: nothing more to serve
        if answer[0] == "run":
            return answer[1], answer[2]
        return None


class RequestControl:
    """A run's :class:`~mayfly.coordinator.runner.RunControl`: the cancels the
    runtime sends for the request at ``where``, through ``link``."""

    def __init__(self, link: RuntimeLink, where: RecordAt) -> None:
        self.link, self.where = link, where

    def fileno(self) -> int | None:
        return self.link.fileno()

    def read(self) -> None:
        self.link.read()

    def canceled(self) -> float | None:
        return self.link.cancel_of(self.where)

    def aborted(self) -> str | None:
        return self.link.abort_of(self.where)


class Appends(Protocol):
    """What a :class:`RuntimeSink` hands its records to, and a coordinator tells
    its request's deadline."""

    def append(self, records: Sequence[Append], *, outcome: bool = False) -> None: ...

    def deadline(self, seconds: float) -> None: ...

    def defer(self, until: datetime) -> None: ...


class DirectLink:
    """Appends straight to a log: a coordinator run in the process that holds
    the log (tools, tests), with no runtime between."""

    def __init__(self, log: EventLog) -> None:
        self.log = log

    def deadline(self, seconds: float) -> None:
        """Nobody watches: the caller runs the coordinator itself."""

    def defer(self, until: datetime) -> None:
        """The caller sees the exit code (DEFERRED) and runs it again itself."""

    def append(self, records: Sequence[Append], *, outcome: bool = False) -> None:
        try:
            self.log.append_many(records)
        except Exception as exc:
            raise SinkError(f"{self.log.describe()} did not take the result: {exc}") from exc


class RuntimeSink:
    """A coordinator's :class:`~mayfly.coordinator.sinks.ResultSink` in the local
    runtime: the records :class:`~mayfly.coordinator.sinks.EventLogSink` would
    append (a rejection on the dead-letter topic too, a shard on its lane),
    made durable together by the runtime's appender."""

    def __init__(self, link: Appends, topics: Topics | None = None) -> None:
        topics = topics or Topics()
        self.link = link
        self.results_topic = topics.results
        self.dead_letter_topic = topics.dead_letter
        self.topics = topics

    def emit(self, event: MayflyEvent) -> None:
        records = outcome_records(event, self.results_topic, self.dead_letter_topic, self.topics)
        # Parts are emitted in order, each durable before the next: the last
        # one (or a rejection) makes the whole outcome durable.
        last = isinstance(event, TaskRejected) or (
            isinstance(event, TaskCompleted) and event.part.index == event.part.count - 1
        )
        self.link.append(records, outcome=last)

    def close(self) -> None:
        pass


def answer_blocking(session: CoordinatorSession, log: EventLog, timeout_s: float = 60.0) -> int:
    """Serve one coordinator as a runtime would, in strict mode: append what it
    hands over, tell it to exit once done. Returns its exit code (1 when it went
    away without saying). For tools and tests that drive a spawner directly."""
    while session.conn.poll(timeout_s):
        for message in session.receive():
            kind = message[0]
            if kind == "append":
                why = None
                try:
                    DirectLink(log).append(message[1])
                except SinkError as exc:
                    why = str(exc)
                session.send(("appended", why))
            elif kind in ("done", "declined"):
                session.send(("exit",))
                return int(message[1]) if kind == "done" else 1
            elif kind == "eof":
                return 1
    return 1
