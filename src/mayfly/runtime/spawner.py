"""The spawner: one coordinator process per request, forked from a warm parent.

At start the runtime forks a *warm parent* (a zygote) while it has no other
threads. The warm parent imports everything a coordinator needs and builds
the wiring (settings, package repository, inventory loader) once; then, per
request, it forks a coordinator process that already has all of that in
memory. Starting a coordinator costs a ``fork()`` (milliseconds), not a fresh
interpreter's half second of imports.

Each coordinator gets a channel to the runtime (:mod:`mayfly.runtime.session`),
passed as a descriptor through the warm parent: over it the coordinator hands
its result to the runtime's appender, says it is done, and is given the next
queued request of its task type or told to exit. The warm parent reports each
coordinator's exit status to the dispatcher. When no request is running, no
coordinator process exists (scale to zero); only the warm parent waits,
holding no request.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import recv_handle, send_handle
from typing import Protocol

from mayfly.errors import ConfigError, MayflyError, RuntimeStartError
from mayfly.eventlog import LogRecord
from mayfly.procs import die_with_parent
from mayfly.runtime.session import Appends, CoordinatorSession, RuntimeLink

__all__ = ["CoordinatorExit", "ForkedWork", "Prepare", "Spawner"]

_FORK = multiprocessing.get_context("fork")
_LOG = logging.getLogger("mayfly.runtime.spawner")


class ForkedWork(Protocol):
    """What the warm parent holds: built once, run in every coordinator it forks."""

    def before_fork(self, record: LogRecord) -> None:
        """Called in the warm parent before it forks the coordinator of ``record``,
        to do in one place what every coordinator would otherwise redo (the
        parsed inventory, the request's verified package). Forks wait for it.
        A serving coordinator calls it too, for each further request."""
        ...

    def accepts(self, record: LogRecord) -> bool:
        """In a serving coordinator, after :meth:`before_fork`: whether ``record``
        may run here (same package digest as the requests before it)."""
        ...

    def run(self, record: LogRecord, dequeued_at: datetime, link: Appends) -> int:
        """Run one request record in a forked coordinator, delivering its outcome
        through ``link``; returns its exit code."""
        ...

    def after_fork(self) -> None:
        """In the warm parent, right after it forked a coordinator (or failed to):
        drop its copies of what it prepared for that coordinator alone."""
        ...

    def close(self) -> None:
        """In the warm parent, as it stops: end what it started (the task zygote)."""
        ...


#: Builds the :class:`ForkedWork` in the warm parent, once. A
#: :class:`~mayfly.errors.MayflyError` it raises stops the start with its message.
Prepare = Callable[[], ForkedWork]


@dataclass(frozen=True)
class CoordinatorExit:
    """A coordinator process ended: its token, exit code (negative: signal) and when."""

    token: str
    returncode: int
    pid: int


def _warm_parent(conn: Connection, prepare: Prepare, runtime_pid: int) -> None:
    die_with_parent(runtime_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        work = prepare()
    except MayflyError as exc:
        # Told to the runtime, which says it in one line: a traceback from a
        # forked process would be all a user saw of a misconfigured store.
        conn.send(("error", isinstance(exc, ConfigError), str(exc), type(exc).__name__))
        return
    try:
        _serve_forks(conn, work, runtime_pid)
    finally:
        work.close()


def _serve_forks(conn: Connection, work: ForkedWork, runtime_pid: int) -> None:
    children: dict[int, tuple[str, int]] = {}  # pidfd -> (token, pid)
    warm_pid = os.getpid()
    conn.send(("ready", os.getpid()))
    while True:
        readable, _, _ = select.select([conn.fileno(), *children], [], [], 1.0)
        if os.getppid() != runtime_pid:
            # PR_SET_PDEATHSIG should have ended us with the runtime; this
            # check is the second lock on that door.
            os._exit(1)
        for fd in readable:
            if fd in children:
                token, pid = children.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                conn.send(("exited", token, os.waitstatus_to_exitcode(status), pid))
                continue
            try:
                message = conn.recv()
            except EOFError:
                return
            if message[0] == "stop":
                return
            _, token, record, dequeued_at = message
            session = recv_handle(conn)  # sent right after the message
            work.before_fork(record)
            # Everything the warm parent holds moves to the permanent generation:
            # a full collection in a coordinator then never walks (and so never
            # copies, page by page) the inherited heap. Measured at 43 ms in a
            # fork when one ran; for short requests it changes nothing. The warm
            # parent takes its objects back at once: frozen, its own cyclic
            # garbage (a failed warm-up's traceback) would never be collected.
            gc.freeze()
            try:
                pid = os.fork()
                if pid == 0:
                    _coordinator_child(conn, work, record, dequeued_at, session, warm_pid)
            finally:
                gc.unfreeze()
                work.after_fork()
            os.close(session)  # the coordinator's now
            # A pidfd turns "this child exited" into a readable fd for select().
            children[os.pidfd_open(pid)] = (token, pid)


def _coordinator_child(
    conn: Connection,
    work: ForkedWork,
    record: LogRecord,
    dequeued_at: datetime,
    session: int,
    warm_parent: int,
) -> None:
    code = 1
    try:
        die_with_parent(warm_parent)  # and if it died before this line, now
        conn.close()  # the pipe belongs to the warm parent
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        link = RuntimeLink(Connection(session))
        link.hello()
        while True:
            code = work.run(record, dequeued_at, link)
            served = link.done(code)
            if served is None:
                break
            record, dequeued_at = served
            work.before_fork(record)
            if not work.accepts(record):
                link.decline()
                break
        code = 0  # every outcome was told over the link; the exit only ends it
    except BaseException:
        code = 1  # the dispatcher takes an exit without "done" as a crash anyway
        _LOG.exception("coordinator crashed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never return into the warm parent's loop


#: A warm parent that dies more often than this is not started again.
_MAX_RESTARTS, _RESTART_WINDOW_S = 5, 60.0


class Spawner:
    """Client side of the warm parent, used by the dispatcher (one thread)."""

    def __init__(self, prepare: Prepare) -> None:
        self._prepare = prepare
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None
        self._restarts: list[float] = []

    def restart(self) -> None:
        """Start a new warm parent after the last one died.

        Forked from a runtime that now has threads (the aggregator's, the log
        clients'): the child only takes its pipe and does its own imports
        (fork holds the import lock), touching none of their state.

        Raises:
            RuntimeStartError: it died ``_MAX_RESTARTS`` times within
                ``_RESTART_WINDOW_S`` (something kills it: not worth a loop),
                or the new one could not start.
        """
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW_S] + [now]
        if len(self._restarts) > _MAX_RESTARTS:
            raise RuntimeStartError(
                f"the warm parent died {len(self._restarts)} times in "
                f"{_RESTART_WINDOW_S:.0f} s; stopping (see the errors above)"
            )
        self.stop()
        self.start()

    def start(self, timeout_s: float = 60.0) -> None:
        """Fork the warm parent and wait until it has done its imports (once).

        Raises:
            ConfigError: the warm parent found the configuration unusable.
            RuntimeStartError: it could not build the coordinator wiring otherwise.
        """
        if self._process is not None:
            return
        parent, child = _FORK.Pipe()
        self._process = _FORK.Process(
            target=_warm_parent,
            args=(child, self._prepare, os.getpid()),
            # Not daemonic: multiprocessing forbids children of daemonic
            # processes, and coordinators fork task processes. The warm
            # parent dies with the runtime through PR_SET_PDEATHSIG instead.
            daemon=False,
            name="mayfly-warm-parent",
        )
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self.stop()
            raise RuntimeStartError(f"the warm parent did not become ready in {timeout_s:.0f} s")
        try:
            message = parent.recv()
        except EOFError:
            message = ("error", False, "the warm parent exited before it was ready", None)
        if message[0] == "error":
            _, is_config, text, kind = message
            self.stop()
            if is_config:
                raise ConfigError(text)
            raise RuntimeStartError(text, kind=kind)

    def fileno(self) -> int:
        assert self._conn is not None
        return self._conn.fileno()

    def spawn(
        self, token: str, record: LogRecord, dequeued_at: datetime | None = None
    ) -> CoordinatorSession:
        """Start one coordinator process for ``record``; its channel to answer on."""
        assert self._conn is not None
        assert self._process is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.send(("spawn", token, record, dequeued_at or datetime.now(UTC)))
            send_handle(self._conn, theirs.fileno(), self._process.pid or 0)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(True)
        return CoordinatorSession(token, Connection(ours.detach()))

    def exits(self, timeout_s: float = 0.0) -> list[CoordinatorExit]:
        """Coordinator processes that ended since the last call."""
        assert self._conn is not None
        found: list[CoordinatorExit] = []
        try:
            while self._conn.poll(timeout_s):
                _, token, code, pid = self._conn.recv()
                found.append(CoordinatorExit(token, code, pid))
                timeout_s = 0.0
        except (EOFError, OSError):
            raise RuntimeError("the warm parent died") from None
        return found

    @property
    def pid(self) -> int | None:
        """The warm parent's pid, while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the warm parent; coordinators still running end with it."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop",))
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None
