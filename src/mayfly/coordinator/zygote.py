"""The task zygote: task processes forked from an interpreter that never held a
request or a secret.

A task process forked from its coordinator starts as a copy of that
coordinator: the warm parent's heap, the parsed inventory, the store's
client, what earlier requests left behind. The sandbox wipes the secrets it
knows of; the rest stays readable to package code. And a fork of that
~55 MB interpreter, with the exit after it, costs about 3 ms of CPU where
one of this zygote costs under 2 (``bench/README.md``).

The warm parent starts one zygote (``python -m mayfly.coordinator.zygote``):
a fresh interpreter with an environment of a few harmless variables, which
imports only what a task process runs (:mod:`mayfly.coordinator.worker`) and
prepares the sandbox's fixed part once. Coordinators forked from the warm
parent inherit a ``SOCK_SEQPACKET`` socket to it. To start a task process a
coordinator sends one message, ``spawn``, carrying five descriptors: the
task's channel, a status socket, the request's cancel flag (a memfd), a
memfd holding the :class:`~mayfly.coordinator.worker.WorkerSpec` as JSON and
one for the params (read at the first ``run``, so a process can be started
before its params are checked). The
zygote forks; the child reads its spec and runs
:func:`~mayfly.coordinator.worker.worker_main`, sandbox first, as a child of
the coordinator would. On the status socket the zygote answers with the
child's pid and a pidfd (the coordinator kills through it), then, when the
child ends, its exit status. When the coordinator closes its end (it ended,
however), the zygote kills that task process: none outlives its coordinator.

A message is one datagram, so coordinators sharing the socket never
interleave; nothing the zygote reads is more than a word and descriptors,
and the spec it never parses (the child does).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from mayfly import sandbox
from mayfly.coordinator.worker import (
    MAX_SPEC_BYTES,
    CancelFlag,
    WorkerSpec,
    read_memfd,
    worker_main,
)
from mayfly.procs import LOG_FORMAT, child_pythonpath, die_with_parent

__all__ = ["EarlyTask", "TaskZygote", "ZygoteTask", "main"]

_LOG = logging.getLogger("mayfly.coordinator.zygote")
_SPAWN = b"spawn"
_READY = b"ready"
_KILL = b"kill"  # on a status socket: end the task process's whole session
_WORD = struct.Struct("=4si")  # a tag and a number: the pid, the exit status, an errno
#: A spawn's descriptors: channel, status socket, cancel flag, spec, params.
_SPAWN_FDS = 5
#: How long a coordinator waits for the zygote's answer to a start (it forks
#: at once; only a wedged zygote takes longer).
_WORD_WAIT_S = 30.0


# --- the coordinator's side ------------------------------------------------


class ZygoteTask:
    """A task process the zygote started, seen from its coordinator.

    Its sentinel is the status socket: readable when the zygote reports the
    pid (:meth:`poll` takes that and answers ``None``) and when it reports the
    exit. A zygote that died says nothing more: its task processes died with
    it (``PR_SET_PDEATHSIG``), which reads as a kill.
    """

    def __init__(self, status: socket.socket) -> None:
        self._status = status
        self.sentinel = status.fileno()
        self._pid: int | None = None
        self._pidfd: int | None = None
        self.exitcode: int | None = None
        self.failure: str | None = None
        """Why it never ran, when the zygote could not start it (its words)."""

    @property
    def pid(self) -> int | None:
        """Its pid, once the zygote said it (this waits for that word, a bounded time)."""
        if self._pid is None and self.exitcode is None and not self._take(_WORD_WAIT_S):
            self._lost()
        return self._pid

    def _lost(self) -> None:
        _LOG.error("the task zygote did not answer in %.0f s; task process lost", _WORD_WAIT_S)
        self.failure = f"the task zygote did not answer in {_WORD_WAIT_S:.0f} s"
        self._ended(-signal.SIGKILL)

    def _take(self, timeout: float) -> bool:
        """Read the zygote's next word, waiting up to ``timeout``; False if none came."""
        self._status.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(self._status, _WORD.size, 1)
        except (BlockingIOError, TimeoutError):
            return False
        except OSError:
            data, fds = b"", []
        tag, number = _WORD.unpack(data) if len(data) == _WORD.size else (b"", 0)
        if tag == b"pid " and len(fds) == 1 and self._pid is None:
            self._pid, self._pidfd = number, fds[0]
            return True
        for fd in fds:
            os.close(fd)
        if tag == b"exit":
            self._ended(number)
        elif tag == b"err ":
            self.failure = f"the task zygote could not fork it: {os.strerror(number)}"
            self._ended(1)
        else:
            if self._pid is None:
                self.failure = "the task zygote ended or refused before starting it"
            self._ended(-signal.SIGKILL)  # the zygote is gone, and its children with it
        return True

    def _ended(self, code: int) -> None:
        self.exitcode = code
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._status.close()

    def poll(self, block: bool = False) -> int | None:
        """Its exit code once it ended (negative: the signal), else None; a
        blocking poll waits a bounded time (a wedged zygote is given up on)."""
        while self.exitcode is None:
            if not self._take(_WORD_WAIT_S if block else 0.0):
                if block:
                    self._lost()
                break
        return self.exitcode

    def is_alive(self) -> bool:
        return self.poll() is None

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.exitcode is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._take(left):
                return

    def forget(self) -> None:
        """Drop this process's copy of the status socket, unread: the process that
        forked after asking (the warm parent) leaves the task to its child."""
        self._status.close()

    def kill(self) -> None:
        """SIGKILL through the pidfd (never another process that got its pid), and
        its whole session through the zygote, which alone knows it is not reaped."""
        if self.pid is not None and self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self._status.send(_KILL)


class TaskZygote:
    """The zygote process and the socket to it.

    Made and started in the warm parent; every coordinator forked after that
    inherits the socket and calls :meth:`start_task`. Only the process that
    started the zygote may :meth:`restart` or :meth:`stop` it.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = 0
        self._restarts = 0
        self._next_restart = 0.0

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The zygote's environment: what a task process keeps anyway.
        env = sandbox.harmless_environment()
        env["PYTHONPATH"] = child_pythonpath(os.environ.get("PYTHONPATH"))
        level = logging.getLogger().getEffectiveLevel()
        try:
            self._process = subprocess.Popen(
                # -P: the current folder (wherever the operator started `mayfly
                # up`) is not put on sys.path, so it is neither imported from
                # nor, through the sandbox's read set, readable by package code.
                [sys.executable, "-P", "-m", __name__, str(theirs.fileno()), str(os.getpid()),
                 str(level)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
                cwd="/",
                close_fds=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self._sock = ours
        self._owner = os.getpid()

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until it did its imports (a coordinator asking sooner waits for them
        instead); False, with a warning, if it will not be ready."""
        if self._sock is None:
            return False
        self._sock.settimeout(timeout_s)
        try:
            word = self._sock.recv(16)
        except (TimeoutError, OSError) as exc:
            word = str(exc).encode()
        finally:
            # Every process holding this socket (it is inherited) sends with a
            # bound: a wedged zygote's full queue fails a start, which then forks.
            self._sock.settimeout(_WORD_WAIT_S)
        if word != _READY:
            _LOG.warning(
                "the task zygote did not start (%s); coordinators fork task processes themselves",
                word.decode(errors="replace") or "it exited",
            )
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def restart_if_dead(self) -> bool:
        """In the process that started it: start it again if it ended. True if it did."""
        if self._process is None or os.getpid() != self._owner:
            return False
        code = self._process.poll()
        if code is None or time.monotonic() < self._next_restart:
            return False  # meanwhile coordinators fork task processes themselves
        self._restarts += 1
        self._next_restart = time.monotonic() + min(60.0, 2.0**self._restarts)
        _LOG.warning("the task zygote exited (%s); starting it again", code)
        self.stop()
        self.start()
        self.wait_ready()
        return True

    def start_task(
        self, channel_fd: int, spec: WorkerSpec, params_fd: int | None = None, *, wait: bool = True
    ) -> ZygoteTask:
        """Have the zygote start a task process on ``channel_fd`` for ``spec``.

        The params go in a memfd the process reads at its first ``run``:
        ``spec.params`` written now, or ``params_fd``, which the caller fills
        (before that first ``run``) once it has checked them.

        Raises:
            OSError: the zygote is not there to ask (or, without ``wait``, its
                queue is full: it is wedged or far behind).
        """
        if self._sock is None:
            raise OSError("the task zygote was never started")
        data = spec.to_json()
        if len(data) > MAX_SPEC_BYTES:
            raise OSError(f"a task spec of {len(data)} bytes is too large for the zygote")
        spec_fd = os.memfd_create("mayfly-spec", os.MFD_CLOEXEC)
        given = params_fd is not None
        if params_fd is None:
            params_fd = params_memfd()
            os.write(params_fd, json.dumps(spec.params).encode())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            os.write(spec_fd, data)
            fds = [channel_fd, theirs.fileno(), spec.cancel.fileno(), spec_fd, params_fd]
            # Not MSG_DONTWAIT: a socket with a timeout waits it out on EAGAIN.
            if not wait and not select.select([], [self._sock], [], 0)[1]:
                raise BlockingIOError("the task zygote's queue is full")
            socket.send_fds(self._sock, [_SPAWN], fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(spec_fd)
            if not given:
                os.close(params_fd)
        return ZygoteTask(ours)

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        process, self._process = self._process, None
        if process is not None and os.getpid() == self._owner:
            # Its socket closed here is not enough while coordinators hold theirs.
            process.kill()
            process.wait(timeout=5)


@dataclass
class EarlyTask:
    """A task process asked for before its coordinator's plan: the warm parent
    asks as it forks the coordinator, which meanwhile checks the request's
    params, resolves its devices and builds its plan on the other core. The
    process enters the sandbox and imports the package; it reads its params
    (:meth:`give_params`) at its first ``run``. Unused, it is killed
    (:meth:`discard`): it never ran package code on anything.
    """

    process: ZygoteTask
    channel_fd: int
    params_fd: int
    spec: WorkerSpec
    """Its request, package, limits, cancel flag and scratch root (its params: none)."""

    @classmethod
    def start(cls, zygote: TaskZygote, spec: WorkerSpec) -> EarlyTask:
        """Ask ``zygote`` for it. Raises OSError when the zygote cannot be asked at
        once: the warm parent, which asks, never waits on a wedged zygote."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        params_fd = params_memfd()
        try:
            process = zygote.start_task(theirs.fileno(), spec, params_fd, wait=False)
        except BaseException:
            ours.close()
            os.close(params_fd)
            raise
        finally:
            theirs.close()
        return cls(process, ours.detach(), params_fd, spec)

    def give_params(self, params: dict[str, object]) -> None:
        """Its request's params, checked: read by the process at its first ``run``."""
        os.write(self.params_fd, json.dumps(params).encode())
        os.close(self.params_fd)
        self.params_fd = -1

    def forget(self) -> None:
        """In the process that asked for it and forked since: close this copy."""
        self.process.forget()
        for fd in (self.channel_fd, self.params_fd):
            if fd >= 0:
                os.close(fd)

    def discard(self) -> None:
        """Not used: kill it and remove its scratch root."""
        self.process.kill()
        self.process.poll(block=True)
        for fd in (self.channel_fd, self.params_fd):
            if fd >= 0:
                os.close(fd)
        if self.spec.scratch_root is not None:
            shutil.rmtree(self.spec.scratch_root, ignore_errors=True)


# --- the zygote's side -------------------------------------------------------


@dataclass
class _Child:
    pid: int
    pidfd: int
    status: socket.socket | None
    reaped: bool = False
    """Waited for: its pid and pidfd are no longer its own (one ``select`` can
    report its exit and its coordinator's hang-up together)."""


def params_memfd() -> int:
    """An empty memfd for a task process's params."""
    return os.memfd_create("mayfly-params", os.MFD_CLOEXEC)


def _child(sock: socket.socket, zygote: int, fds: list[int], status: int) -> None:
    channel, _, cancel, spec_fd, params_fd = fds
    code = 1
    try:
        die_with_parent(zygote)  # and if the zygote died since the fork, exit now
        sock.close()
        os.close(status)
        data = read_memfd(spec_fd, MAX_SPEC_BYTES)
        spec = WorkerSpec.from_json(data, CancelFlag(cancel), params_fd)
        os.close(spec_fd)
        worker_main(channel, spec, zygote)  # the sandbox closes every other descriptor
        code = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _spawn(sock: socket.socket, fds: list[int], children: dict[int, _Child],
           selector: selectors.BaseSelector) -> None:  # fmt: skip
    status = socket.socket(fileno=fds[1])
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        with contextlib.suppress(OSError):
            status.send(_WORD.pack(b"err ", exc.errno or 0))
        status.close()
        for fd in (fds[0], *fds[2:]):
            os.close(fd)
        return
    if pid == 0:
        selector.close()
        for child in children.values():
            os.close(child.pidfd)
            if child.status is not None:
                child.status.close()
        _child(sock, zygote, fds, status.detach())
    for fd in (fds[0], *fds[2:]):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    child = _Child(pid, pidfd, status)
    children[pidfd] = child
    selector.register(pidfd, selectors.EVENT_READ, ("exit", child))
    try:
        socket.send_fds(status, [_WORD.pack(b"pid ", pid)], [pidfd])
    except OSError:
        status.close()  # its coordinator is gone already
        child.status = None
        _kill_session(child)
    else:
        selector.register(status, selectors.EVENT_READ, ("peer", child))


def _kill_session(child: _Child) -> None:
    """SIGKILL the task process and its session (where seccomp could not stop it
    starting processes). Only before it is reaped: until then its pid, and so
    its session's id, cannot belong to anyone else."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # no such group before its setsid()
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)


def _from_coordinator(child: _Child, selector: selectors.BaseSelector) -> None:
    """Its coordinator asks for a kill, or closed the status socket (it ended,
    however): either way the task process and its session go."""
    if child.reaped or child.status is None:
        return  # gone already, reported in the same select as its exit

    try:
        word = child.status.recv(16)
    except OSError:
        word = b""
    if word == _KILL:
        _kill_session(child)
        return  # its exit is still reported
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(child.status)
    child.status.close()
    child.status = None
    _kill_session(child)


def _reap(child: _Child, children: dict[int, _Child], selector: selectors.BaseSelector) -> None:
    selector.unregister(child.pidfd)
    del children[child.pidfd]
    # It exited: whatever is left in its session goes with it, while the zombie
    # still holds the session's id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    _, status = os.waitpid(child.pid, 0)
    os.close(child.pidfd)
    child.reaped = True
    if child.status is not None:
        with contextlib.suppress(OSError):
            child.status.send(_WORD.pack(b"exit", os.waitstatus_to_exitcode(status)))
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(child.status)
        child.status.close()
        child.status = None


def serve(sock: socket.socket) -> None:
    """Start task processes until no process holds the other end of ``sock``."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    children: dict[int, _Child] = {}
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    data, fds, flags, _ = socket.recv_fds(sock, len(_SPAWN), _SPAWN_FDS)
                except InterruptedError:
                    continue
                if not data and not fds:
                    return  # the warm parent and every coordinator are gone
                if data != _SPAWN or len(fds) != _SPAWN_FDS or flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    _LOG.warning("a malformed request to the task zygote, ignored")
                    continue
                # Nothing this process allocated since its imports is shared
                # with the child as garbage to walk: see the warm parent's note.
                gc.freeze()
                _spawn(sock, fds, children, selector)
            else:
                kind, child = key.data
                if kind == "exit":
                    _reap(child, children, selector)
                else:
                    _from_coordinator(child, selector)


def main(argv: list[str]) -> None:
    """``python -m mayfly.coordinator.zygote FD PARENT_PID LOG_LEVEL``."""
    fd, parent, level = (int(a) for a in argv)
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the runtime decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # Two descriptors per running task process (its pidfd, its status socket):
    # as many as the hard limit allows, so a busy runtime never runs out here.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sandbox.prepare()
    sock = socket.socket(fileno=fd)
    try:
        sock.send(_READY)  # read by the warm parent only, before it forks anyone
        serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
