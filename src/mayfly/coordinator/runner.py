"""Fan-out: run a package on many devices in task processes, bounded and timed.

The coordinator's loop runs on one thread: it forks task processes (at most
the allowed parallelism), hands each one device at a time over its channel
(bounded JSON frames, :mod:`mayfly.coordinator.frames`), and waits on all
channels and process sentinels at once. That keeps these promises:

- a device attempt that overruns its per-device timeout is ended by killing
  its task process (package code cannot ignore that) and recorded as
  ``timed_out``; a replacement process takes the next device;
- a task process that dies (memory, CPU limit, a crash) or sends anything
  but a valid frame fails only the device it was running, and every process
  it could have started ends with it (it has its own session, killed whole);
- a task process reaches only the device of its current attempt: its device
  calls arrive as frames and the coordinator makes them
  (:mod:`mayfly.coordinator.devicecalls`: on non-blocking sockets this loop
  watches, or on threads that never touch the loop's state, whose finished
  calls come back through a pipe the loop watches too);
- failed attempts are retried up to the manifest's limit with backoff, and
  the request's own deadline and failure budget stop the rest cleanly;
- a rollout's abort criteria (``rollout.abort``), once met, stop it: queued
  devices are skipped and running attempts killed, and the run says why;
- a paced rollout (``rollout.rate_per_minute``, ``ramp``, ``waves``) starts
  each device's first attempt only when :class:`~mayfly.coordinator.pacing.Pace`
  allows; the devices an earlier coordinator of the same request ended
  (``RunPlan.earlier``) are not run again, their results are kept, and they
  count toward the pace, the waves, the abort and the failure budget;
- a cancel (the cancel flag, or the runtime through :class:`RunControl`) is
  cooperative first: queued devices are skipped, nothing is retried, running
  attempts see ``ctx.cancelled()`` and may finish; at the end of the grace
  period the ones still running are killed and their device calls dropped,
  so no device is reached after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mayfly import sandbox
from mayfly.coordinator.devicecalls import DeviceCalls, abandoned_answer
from mayfly.coordinator.frames import Channel, ProtocolError, check_task_frame
from mayfly.coordinator.pacing import Pace
from mayfly.coordinator.worker import WorkerSpec, worker_main
from mayfly.devices import Device, DeviceDriver
from mayfly.events import (
    MAX_DEVICE_LOG_LINES,
    MAX_LOG_MESSAGE,
    Abort,
    DeviceResult,
    DeviceStatus,
    LogLine,
    Rollout,
)

_LOG = logging.getLogger("mayfly.coordinator.runner")
#: Where a package's ``ctx.log`` lines are logged, tagged with request, device
#: and attempt (``mayfly up -v`` shows info; warnings and errors always).
_TASK_LOG = logging.getLogger("mayfly.task")
#: Characters of package lines one request keeps in its result, shared out
#: evenly over its devices: a chatty package on a large fleet does not make a
#: huge result, and no device's lines crowd out another's.
MAX_REQUEST_LOG_CHARS = 1_000_000
#: A device's share is never smaller than this (its latest line, cut).
_MIN_LOG_SHARE = 80

__all__ = [
    "DeviceProgress",
    "ForkStarter",
    "Prestarted",
    "ProgressFn",
    "RunControl",
    "RunPlan",
    "RunReporter",
    "TaskHandle",
    "TaskStarter",
    "make_scratch_root",
    "run_devices",
    "run_plan",
]

ProgressFn = Callable[["DeviceProgress"], None]

#: The device outcomes each ``rollout.abort.outcome`` counts.
_ABORT_OUTCOMES = {
    "failed": frozenset({DeviceStatus.FAILED}),
    "timed_out": frozenset({DeviceStatus.TIMED_OUT}),
    "any": frozenset({DeviceStatus.FAILED, DeviceStatus.TIMED_OUT}),
}


@dataclass(frozen=True)
class DeviceProgress:
    """A progress or status change of one device, for live displays."""

    device_id: str
    status: DeviceStatus
    percent: float = 0.0
    message: str = ""
    attempt: int = 0


@runtime_checkable
class RunReporter(Protocol):
    """A :data:`ProgressFn` that also reports on its own clock: told when the run
    starts, and ticked at least every half second while it goes on."""

    def __call__(self, progress: DeviceProgress) -> None: ...

    def started(self, devices: int, skipped: int) -> None: ...

    def tick(self) -> None: ...

    def ended(self, result: DeviceResult) -> None:
        """A device reached its end here (a paced run's checkpoint)."""

    def flush(self) -> None:
        """Report what is left now: the run hands its other devices over."""

    def line(self, device_id: str, line: LogLine) -> None:
        """A line the package wrote (``ctx.log``) on a device."""
        ...


class RunControl(Protocol):
    """Where a run hears it is canceled from, besides its cancel flag (which
    means: now): the runtime that handed the request over."""

    def fileno(self) -> int | None:
        """Readable when there may be news (then :meth:`read`); None: no more can come."""
        ...

    def read(self) -> None:
        """Take in what arrived, without blocking."""
        ...

    def canceled(self) -> float | None:
        """Once this run is canceled: the seconds its running attempts may take
        to end on their own before they are killed. No I/O."""
        ...

    def aborted(self) -> str | None:
        """Why the rollout aborted, when this cancel is its abort (another shard
        of it met its abort criteria). No I/O."""
        ...


class TaskHandle(Protocol):
    """A started task process, as the loop watches and ends it."""

    sentinel: int
    """Readable when there is news of the process (:meth:`poll` says if it ended)."""
    exitcode: int | None
    failure: str | None
    """Why it never ran, when its starter could not start it."""

    @property
    def pid(self) -> int | None: ...

    def poll(self, block: bool = False) -> int | None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float) -> None: ...

    def kill(self) -> None:
        """SIGKILL it, and whatever it started (that part even after it ended)."""
        ...


class TaskStarter(Protocol):
    """Starts a task process serving ``spec`` on the channel ``channel_fd``
    (the caller closes its copy of that descriptor afterwards)."""

    def start_task(self, channel_fd: int, spec: WorkerSpec) -> TaskHandle: ...


class Prestarted(Protocol):
    """A task process started before the plan (:class:`~mayfly.coordinator.zygote.EarlyTask`)."""

    @property
    def process(self) -> TaskHandle: ...

    @property
    def channel_fd(self) -> int: ...

    @property
    def spec(self) -> WorkerSpec: ...

    def give_params(self, params: dict[str, Any]) -> None: ...

    def discard(self) -> None: ...


@dataclass(frozen=True)
class RunPlan:
    """How to run one request's package over its devices."""

    spec: WorkerSpec
    devices: list[Device]
    driver_factory: Callable[[], DeviceDriver]
    """Makes the driver the coordinator reaches devices with (task processes cannot)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Devices not run at all, with the reason (e.g. a missing capability)."""
    parallel: int = 1
    device_timeout_s: float = 30.0
    retries: int = 0
    deadline: float = math.inf
    """``time.monotonic()`` after which nothing new starts and running attempts end."""
    max_failure_ratio: float | None = None
    retry_backoff_s: float = 0.2
    starter: TaskStarter | None = None
    """Where task processes come from: by default forked from this process."""
    prestarted: Prestarted | None = None
    """The request's first task process, started already (its scratch root is
    the run's); it gets the params of ``spec`` before its first device."""
    request_source: str = ""
    """The request's CloudEvent source: with its id, what a device's
    idempotency keys derive from (two publishers may reuse one id)."""
    control: RunControl | None = None
    """Where a cancel with a grace period may come from (the runtime)."""
    abort: Abort | None = None
    """When the rollout stops itself."""
    pace: Rollout | None = None
    """The rollout whose rate, ramp and waves pace the devices' starts."""
    pace_share: float = 1.0
    """This run's share of the request's rate (a shard's)."""
    earlier: dict[str, DeviceResult] = field(default_factory=dict)
    """Devices an earlier coordinator of this request ended, with their results:
    not run again (a coordinator that died left them done)."""
    starts_until: float = math.inf
    """``time.monotonic()`` from which no device starts (its schedule's window
    closes): the run ends once what started ended, the rest left ``queued``."""
    checkpoint: bool = False
    """Report each device's result as it ends (a later coordinator goes on)."""


@dataclass
class _Device:
    device: Device
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: DeviceStatus = DeviceStatus.QUEUED
    output: Any = None
    error: str | None = None
    lines: deque[LogLine] | None = None
    """The package's last lines here (made at the first: most devices have none)."""
    chars: int = 0
    dropped: int = 0

    def keep(self, line: LogLine, share: int) -> None:
        """Keep ``line``, the oldest going while over the lines or ``share`` chars."""
        if self.lines is None:
            self.lines = deque()
        last = self.lines[-1] if self.lines else None
        if line.level == "progress" and last is not None and last.level == "progress":
            self.chars -= len(self.lines.pop().message)  # in a row: the latest says it all
        self.lines.append(line)
        self.chars += len(line.message)
        while len(self.lines) > 1 and (
            len(self.lines) > MAX_DEVICE_LOG_LINES or self.chars > share
        ):
            self.chars -= len(self.lines.popleft().message)
            self.dropped += 1

    def result(self) -> DeviceResult:
        return DeviceResult(
            device_id=self.device.id,
            status=self.status,
            started_at=self.started_at,
            finished_at=self.finished_at,
            attempts=self.attempts,
            output=self.output,
            error=self.error,
            logs=tuple(self.lines or ()),
            logs_dropped=self.dropped,
        )


class _ForkedTask:
    """A task process forked from this one, watched through a pidfd.

    Not a multiprocessing.Process: its sentinel is a pipe the child must keep
    open, and the sandbox closes every descriptor but the channel.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)
        self.exitcode: int | None = None
        self.failure: str | None = None  # a fork that failed raised instead

    def poll(self, block: bool = False) -> int | None:
        if self.exitcode is None:
            done, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if done:
                self.exitcode = os.waitstatus_to_exitcode(status)
                os.close(self.sentinel)
        return self.exitcode

    def is_alive(self) -> bool:
        return self.poll() is None

    def join(self, timeout: float) -> None:
        if self.exitcode is None and select.select([self.sentinel], [], [], timeout)[0]:
            self.poll(block=True)

    def kill(self) -> None:
        # Its own session: whatever it started goes with it, even after it ended.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)


def _start(fd: int, spec: WorkerSpec) -> int:
    coordinator = os.getpid()
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        worker_main(fd, spec, coordinator)
        code = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # never return into the coordinator's code


class ForkStarter:
    """Task processes forked from the coordinator itself (job mode, and when no
    zygote answers): the sandbox then wipes what it knows of the coordinator's
    secrets from the copy."""

    def start_task(self, channel_fd: int, spec: WorkerSpec) -> TaskHandle:
        return _ForkedTask(_start(channel_fd, spec))


@dataclass(eq=False)  # found by identity: the loop looks workers up all the time
class _Worker:
    process: TaskHandle
    channel: Channel
    ready: bool = False
    job: _Device | None = None
    job_deadline: float = math.inf
    call: object | None = None
    """The device call it waits on, if any (a token matched with its answer)."""
    ordinals: dict[str, int] = field(default_factory=dict)
    """Calls of each action name in the current attempt (idempotency keys)."""


def _now() -> datetime:
    return datetime.now(UTC)


class _Run:
    def __init__(self, plan: RunPlan, on_progress: ProgressFn | None) -> None:
        self.plan = plan
        self.on_progress = on_progress or (lambda _p: None)
        self.reporter = on_progress if isinstance(on_progress, RunReporter) else None
        self.states = {d.id: _Device(d) for d in plan.devices if d.id not in plan.earlier}
        self.earlier = [r for r in plan.earlier.values() if r.device_id not in plan.skipped]
        # (ready_at, sequence, device): retries wait for their backoff.
        self.queue: list[tuple[float, int, _Device]] = []
        self.seq = itertools.count()
        sample = plan.abort.min_devices if plan.abort is not None else len(self.states)
        # Past the abort's sample, devices wait outside the queue for its verdict
        # (its first min_devices all ended): a rollout that must abort touches
        # hardly more than its sample.
        self.held: deque[_Device] = deque()
        for index, state in enumerate(self.states.values()):
            if index < sample:
                heapq.heappush(self.queue, (0.0, next(self.seq), state))
            else:
                self.held.append(state)
        self.workers: list[_Worker] = []
        self.prestarted = plan.prestarted
        if self.prestarted is not None and self.prestarted.spec.scratch_root is not None:
            self.scratch = self.prestarted.spec.scratch_root
        else:
            # Task processes' private folders; 0711 so each can reach only its own.
            self.scratch = make_scratch_root()
        self.spec = dataclasses.replace(plan.spec, scratch_root=self.scratch)
        self.failed = 0
        self.finished = 0
        self.succeeded = 0
        self.started = 0
        """Devices that had a first attempt (here or under an earlier coordinator)."""
        self.log_share = max(
            _MIN_LOG_SHARE,
            min(
                MAX_DEVICE_LOG_LINES * MAX_LOG_MESSAGE,
                MAX_REQUEST_LOG_CHARS // max(1, len(self.states)),
            ),
        )
        self.import_error: str | None = None
        self.calls = DeviceCalls(
            plan.driver_factory, plan.spec.request_id, source=plan.request_source
        )
        self._warmed = False
        self._forks = ForkStarter()
        self.starter: TaskStarter = plan.starter or self._forks
        sandbox.prepare()  # once here, not in every task process (inherited)
        self.call_seq = itertools.count()
        self._poll = select.poll()
        self._polled: set[int] = set()
        self.aborted: str | None = None
        """Why the rollout stopped itself, once it did."""
        self.ran = 0
        """Devices that ended after running (not skipped, not canceled)."""
        self.matched = 0
        """Of those, the ones whose outcome counts toward the abort."""
        self.hard_stop_at: float | None = None
        """Once canceled: ``time.monotonic()`` at which running attempts are killed."""
        self.grace_s = 0.0
        for result in self.earlier:
            self._count(result.status)
        self.started = self.finished
        self.pace = (
            Pace(
                plan.pace,
                len(self.states) + len(self.earlier),
                now=time.monotonic(),
                share=plan.pace_share,
            )
            if plan.pace is not None and plan.pace.paced
            else None
        )

    # -- process management --------------------------------------------------

    def _spawn(self) -> None:
        if self.prestarted is not None:
            early, self.prestarted = self.prestarted, None
            early.give_params(self.spec.params)
            os.set_blocking(early.channel_fd, False)
            self.workers.append(_Worker(early.process, Channel(early.channel_fd)))
            self._warm_calls()
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = self._start_task(theirs.fileno())
        finally:
            theirs.close()
        ours.setblocking(False)
        self.workers.append(_Worker(process, Channel(ours.detach())))
        self._warm_calls()

    def _warm_calls(self) -> None:
        if not self._warmed:
            self._warmed = True
            self.calls.warm()  # after the start: the process starts meanwhile

    def _start_task(self, channel_fd: int) -> TaskHandle:
        if self.starter is not self._forks:
            try:
                return self.starter.start_task(channel_fd, self.spec)
            except OSError as exc:
                # Still sandboxed, only forked from here: slower, never unsafe.
                _LOG.warning("task zygote unusable (%s); forking task processes here", exc)
                self.starter = self._forks
        return self._forks.start_task(channel_fd, self.spec)

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        pid = worker.process.pid
        if worker.call is not None:
            # Its attempt is over: the engine must not send the call, or a retry
            # of it, to the device after the process that asked is gone.
            self.calls.drop(worker.call)
            worker.call = None
        if kill and worker.process.is_alive():
            worker.process.kill()
        else:
            with contextlib.suppress(BlockingIOError, BrokenPipeError, OSError):
                worker.channel.send({"t": "stop"})
        worker.process.join(timeout=5)
        if worker.process.exitcode is None:  # it would not stop when asked
            worker.process.kill()
            worker.process.poll(block=True)
        worker.process.kill()  # anything left in its session
        worker.channel.close()
        self.workers.remove(worker)
        if pid is not None:
            shutil.rmtree(self.scratch / f"task-{pid}", ignore_errors=True)

    # -- device outcomes -----------------------------------------------------

    def _finish(
        self, state: _Device, status: DeviceStatus, *, output: Any = None, error: str | None = None
    ) -> None:
        state.status = status
        state.output = output
        state.error = error
        state.finished_at = _now()
        self._count(status)
        if self.reporter is not None and (self.pace is not None or self.plan.checkpoint):
            # A paced run's checkpoint; the fast path builds no result twice.
            self.reporter.ended(state.result())
        self.on_progress(
            DeviceProgress(
                state.device.id,
                status,
                100.0 if status is DeviceStatus.SUCCEEDED else 0.0,
                error or "",
                state.attempts,
            )
        )

    def _count(self, status: DeviceStatus) -> None:
        self.finished += 1
        if status is DeviceStatus.SUCCEEDED:
            self.succeeded += 1
        else:
            self.failed += 1
        if status not in (DeviceStatus.SKIPPED, DeviceStatus.CANCELED):
            self.ran += 1
            abort = self.plan.abort
            if abort is not None and status in _ABORT_OUTCOMES[abort.outcome]:
                self.matched += 1

    def _attempt_failed(self, state: _Device, status: DeviceStatus, error: str) -> None:
        if self.hard_stop_at is not None:
            # Canceled: no retry; what it ended with is part of the story.
            self._finish(
                state,
                DeviceStatus.CANCELED,
                error=f"request canceled; attempt {state.attempts} ended: {error}",
            )
        elif state.attempts <= self.plan.retries and time.monotonic() < self.plan.deadline:
            backoff = self.plan.retry_backoff_s * 2 ** (state.attempts - 1)
            state.error = error
            heapq.heappush(self.queue, (time.monotonic() + backoff, next(self.seq), state))
            self.on_progress(
                DeviceProgress(
                    state.device.id,
                    DeviceStatus.QUEUED,
                    0.0,
                    f"retrying after: {error}",
                    state.attempts,
                )
            )
        else:
            self._finish(state, status, error=error)

    def _keep_line(
        self, state: _Device, level: str, message: str, percent: float | None = None
    ) -> LogLine:
        """Keep one of the package's lines in the device's result, within the
        device's share of the request's budget; the line as kept."""
        line = LogLine(
            at=_now(),
            attempt=state.attempts,
            level=level,
            message=message[: min(MAX_LOG_MESSAGE, self.log_share)],
            percent=percent,
        )
        state.keep(line, self.log_share)
        return line

    def _log(self, state: _Device, level: str, message: str) -> None:
        number = logging.getLevelName(level.upper())
        if _TASK_LOG.isEnabledFor(number):
            # One line per record, whatever the package wrote: nothing it sends
            # can start a line of the runtime's output or steer a terminal.
            _TASK_LOG.log(
                number,
                "%s %s #%d: %s",
                self.plan.spec.request_id,
                state.device.id,
                state.attempts,
                message.encode("unicode_escape").decode("ascii"),
            )
        line = self._keep_line(state, level, message)
        if self.reporter is not None:
            self.reporter.line(state.device.id, line)

    def _over_failure_budget(self) -> bool:
        ratio = self.plan.max_failure_ratio
        return ratio is not None and self.failed > ratio * (len(self.states) + len(self.earlier))

    def _release(self) -> None:
        """Queue the devices held past the abort's sample."""
        while self.held:
            heapq.heappush(self.queue, (0.0, next(self.seq), self.held.popleft()))

    def _skip_queued(
        self,
        status: DeviceStatus,
        reason: str,
        retrying: DeviceStatus = DeviceStatus.FAILED,
        retry_reason: str | None = None,
    ) -> None:
        """End every device not running: ``status`` for those never started,
        ``retrying`` for those waiting to retry (their own error, then
        ``retry_reason``, by default ``reason``)."""
        self._release()
        while self.queue:
            _, _, state = heapq.heappop(self.queue)
            if state.attempts:
                # Waiting for a retry: its own failure is the story, not the skip.
                why = retry_reason or reason
                self._finish(state, retrying, error=f"{state.error}; {why}")
            else:
                self._finish(state, status, error=reason)

    # -- the loop --------------------------------------------------------------

    def _dispatch(self) -> None:
        # Fork what the pending work can use, all at once: a task process
        # costs a few milliseconds, and idle ones are never kept.
        now = time.monotonic()
        want = min(self.plan.parallel, self._pending())
        if self.pace is not None:
            # Paced: a process for each device the pace lets start soon, not
            # for every device queued (they would idle for minutes).
            running = sum(1 for w in self.workers if w.job is not None)
            want = min(want, running + 1)
        while len(self.workers) < want:
            self._spawn()
        idle = [w for w in self.workers if w.ready and w.job is None]
        while idle and self.queue and self.queue[0][0] <= now:
            if self.queue[0][2].attempts == 0 and (
                now >= self.plan.starts_until or not self._paced_start(now)
            ):
                break
            _, _, state = heapq.heappop(self.queue)
            worker = idle.pop()
            state.attempts += 1
            state.status = DeviceStatus.RUNNING
            if state.started_at is None:
                state.started_at = _now()
            worker.job = state
            worker.job_deadline = min(now + self.plan.device_timeout_s, self.plan.deadline)
            worker.call = None
            worker.ordinals = {}
            worker.channel.send(
                {
                    "t": "run",
                    "device": _described(state.device),
                    "attempt": state.attempts,
                    "remaining_s": max(0.0, worker.job_deadline - now),
                }
            )
            self.on_progress(
                DeviceProgress(state.device.id, DeviceStatus.RUNNING, 0.0, "", state.attempts)
            )

    def _paced_start(self, now: float) -> bool:
        """Whether the pace lets one more device start now (counted if so)."""
        if self.pace is not None and not self.pace.take(
            now, started=self.started, ended=self.finished, succeeded=self.succeeded
        ):
            return False
        self.started += 1
        return True

    def _pending(self) -> int:
        return len(self.queue) + sum(1 for w in self.workers if w.job is not None)

    def _on_frame(self, worker: _Worker, frame: dict[str, Any]) -> None:
        kind = frame["t"]
        if kind == "ready":
            worker.ready = True
        elif kind == "import_failed":
            self.import_error = f"cannot load entrypoint: {frame['error']}"
        elif kind == "progress" and worker.job is not None:
            state = worker.job
            line = self._keep_line(state, "progress", frame["message"], frame["percent"])
            if self.reporter is not None:
                self.reporter.line(state.device.id, line)
            self.on_progress(
                DeviceProgress(
                    state.device.id,
                    DeviceStatus.RUNNING,
                    frame["percent"],
                    frame["message"],
                    state.attempts,
                )
            )
        elif kind == "log":
            if worker.job is not None:  # else written as the package loaded: nobody's
                self._log(worker.job, frame["level"], frame["message"])
        elif kind == "call" and worker.job is not None:
            if worker.call is not None:
                raise ProtocolError("a device call while its last one is unanswered")
            worker.call = next(self.call_seq)
            self.calls.submit(
                worker.call, worker.job.device, frame, worker.ordinals, worker.job_deadline
            )
        elif kind == "done" and worker.job is not None:
            state, worker.job, worker.job_deadline = worker.job, None, math.inf
            worker.call = None
            if frame["ok"]:
                try:
                    output = _output(frame["output"])
                except ProtocolError as exc:
                    self._attempt_failed(state, DeviceStatus.FAILED, str(exc))
                else:
                    self._finish(state, DeviceStatus.SUCCEEDED, output=output)
            else:
                self._attempt_failed(state, DeviceStatus.FAILED, frame["error"] or "failed")
        elif kind in ("progress", "done", "call"):
            raise ProtocolError(f"a {kind!r} frame while no device was given to it")

    def _on_protocol_error(self, worker: _Worker, exc: ProtocolError) -> None:
        state = worker.job
        worker.job = None
        self._retire(worker, kill=True)
        if state is not None:
            self._attempt_failed(state, DeviceStatus.FAILED, f"task process broke protocol: {exc}")
        elif not worker.ready:
            self.import_error = f"task process broke protocol before it was ready: {exc}"

    def _on_death(self, worker: _Worker) -> None:
        # The pipe can report EOF a moment before the process is reaped.
        worker.process.join(timeout=2)
        code = worker.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            why = {
                "SIGXCPU": f"{name}: CPU limit of {self.plan.spec.cpu_seconds} s exceeded",
                "SIGKILL": f"{name}: killed (out of memory?)",
            }.get(name, name)
        else:
            why = f"exit code {code}"
        if worker.process.failure:
            why = worker.process.failure  # it never ran: its starter says why
        state = worker.job
        worker.job = None
        self._retire(worker, kill=True)
        if state is not None:
            self._attempt_failed(state, DeviceStatus.FAILED, f"task process died ({why})")

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.job is not None and now >= worker.job_deadline:
                state, worker.job = worker.job, None
                self._retire(worker, kill=True)
                past_request = now >= self.plan.deadline
                limit = (
                    "request deadline"
                    if past_request
                    else (f"per-device timeout of {self.plan.device_timeout_s:g} s")
                )
                self._attempt_failed(
                    state, DeviceStatus.TIMED_OUT, f"attempt {state.attempts} exceeded the {limit}"
                )

    def run(self) -> list[DeviceResult]:
        if self.reporter is not None:
            self.reporter.started(len(self.states) + len(self.earlier), len(self.plan.skipped))
        for result in self.earlier:  # ended under an earlier coordinator
            self.on_progress(
                DeviceProgress(result.device_id, result.status, 0.0, "", result.attempts)
            )
        try:
            self._loop()
            if self.reporter is not None and self.plan.checkpoint:
                self.reporter.flush()  # a later coordinator of it goes on from there
        finally:
            if self.prestarted is not None:  # no device needed it
                self.prestarted.discard()
                self.prestarted = None
            for worker in list(self.workers):
                self._retire(worker, kill=worker.job is not None)
            self.calls.close()
            shutil.rmtree(self.scratch, ignore_errors=True)
        results = []
        for device_id, reason in self.plan.skipped.items():
            results.append(
                DeviceResult(device_id=device_id, status=DeviceStatus.SKIPPED, error=reason)
            )
        results.extend(self.earlier)
        results.extend(state.result() for state in self.states.values())
        return results

    def _loop(self) -> None:
        while self.queue or self.held or any(w.job is not None for w in self.workers):
            if self.import_error is not None:
                self._skip_queued(DeviceStatus.FAILED, self.import_error)
                return
            if self.hard_stop_at is None and (grace := self._cancel_asked()) is not None:
                self._begin_cancel(grace)
            if self.hard_stop_at is not None and time.monotonic() >= self.hard_stop_at:
                reason = "request canceled"
                if self.grace_s > 0:
                    reason += f": still running at the end of the {self.grace_s:g} s grace period"
                self._stop_all(DeviceStatus.CANCELED, reason)
                return
            if time.monotonic() >= self.plan.deadline:
                self._enforce_deadlines()
                self._skip_queued(DeviceStatus.SKIPPED, "request deadline passed before start")
                continue
            if self.aborted is None and (why := self._abort_met()) is not None:
                self._abort(why)
                continue
            if time.monotonic() >= self.plan.starts_until and self._only_unstarted():
                self._release()
                self.queue.clear()  # left queued: the schedule holds them
                return
            if self.held and (self._sample_judged() or not self._pending()):
                self._release()  # the sample passed (or ended short of it)
            if self._over_failure_budget():
                self._skip_queued(
                    DeviceStatus.SKIPPED,
                    f"skipped: failures exceeded max_failure_ratio {self.plan.max_failure_ratio}",
                )
            self._dispatch()
            self._wait()  # half a second at most
            self._enforce_deadlines()
            if self.reporter is not None:
                self.reporter.tick()

    def _only_unstarted(self) -> bool:
        """Nothing runs, and nothing waits for a retry: only first starts left."""
        return not any(w.job is not None for w in self.workers) and all(
            state.attempts == 0 for _, _, state in self.queue
        )

    def _sample_judged(self) -> bool:
        """Whether the abort's sample all ended, and it did not abort."""
        abort = self.plan.abort
        return abort is None or self.ran >= abort.min_devices

    def _abort_met(self) -> str | None:
        """Why the rollout must stop now, once its abort criteria are met."""
        abort = self.plan.abort
        if abort is None or self.ran < abort.min_devices:
            return None
        share = 100.0 * self.matched / self.ran
        if share < abort.threshold_pct:
            return None
        what = "did not succeed" if abort.outcome == "any" else abort.outcome.replace("_", " ")
        return (
            f"{self.matched} of {self.ran} devices {what} ({share:.0f} %; abort at"
            f" {abort.threshold_pct:g} % once {abort.min_devices} ran)"
        )

    def _abort(self, why: str) -> None:
        """Stop the rollout: what is queued is skipped, what runs is killed."""
        self.aborted = why
        _LOG.warning("%s: rollout aborted: %s", self.plan.spec.request_id, why)
        reason = f"rollout aborted: {why}"
        self._kill_running(DeviceStatus.CANCELED, reason)
        self._skip_queued(DeviceStatus.SKIPPED, reason, retrying=DeviceStatus.CANCELED)

    def _cancel_asked(self) -> float | None:
        """The grace period of a cancel of this run, once there is one."""
        if self.plan.control is not None and (grace := self.plan.control.canceled()) is not None:
            return max(0.0, grace)
        return 0.0 if self.plan.spec.is_canceled() else None

    def _begin_cancel(self, grace_s: float) -> None:
        """Skip what is queued, retry nothing, and tell the running attempts
        (``ctx.cancelled()``); they are killed once ``grace_s`` is over. A
        cancel that is the rollout's abort ends this run aborted, with why."""
        if self.aborted is None and self.plan.control is not None:
            self.aborted = self.plan.control.aborted()
        self.grace_s = grace_s
        self.hard_stop_at = time.monotonic() + grace_s
        self.plan.spec.cancel.set()
        # A call in flight may wait long (a device's Retry-After): given up now,
        # so the attempt hears of the cancel. New calls within the grace go out.
        for worker in [w for w in self.workers if w.call is not None]:
            self.calls.drop(worker.call)
            worker.call = None
            try:
                worker.channel.write(abandoned_answer("the request was canceled"))
            except BlockingIOError:
                self._on_protocol_error(worker, ProtocolError("it does not read its answers"))
            except OSError:
                self._on_death(worker)
        self._skip_queued(
            DeviceStatus.SKIPPED,
            "request canceled before it started",
            DeviceStatus.CANCELED,
            "request canceled before its retry",
        )
        _LOG.info(
            "%s canceled: %d attempt(s) running get %g s to end",
            self.plan.spec.request_id,
            sum(1 for w in self.workers if w.job is not None),
            grace_s,
        )

    def _kill_running(self, status: DeviceStatus, reason: str) -> None:
        for worker in list(self.workers):
            if worker.job is not None:
                state, worker.job = worker.job, None
                self._retire(worker, kill=True)
                self._finish(state, status, error=reason)

    def _stop_all(self, status: DeviceStatus, reason: str) -> None:
        self._kill_running(status, reason)
        self._skip_queued(status, reason)

    def _wait(self) -> None:
        now = time.monotonic()
        wake = [w.job_deadline for w in self.workers if w.job is not None]
        # A queued retry only matters when a ready process could take it;
        # otherwise the next event is a message ("ready", "done") anyway.
        if self.queue and any(w.ready and w.job is None for w in self.workers):
            wake.append(self.queue[0][0])
            if self.pace is not None and self.queue[0][2].attempts == 0:
                wake.append(self.pace.next_at(now, self.succeeded) or math.inf)
        wake.append(self.plan.deadline)
        if self.hard_stop_at is not None:
            wake.append(self.hard_stop_at)
        # A device call's timeout or retry wait falling due, on the engine's clock.
        wake.append(self.calls.next_wake())
        timeout = max(0.0, min(min(wake) - now, 0.5))
        handles: dict[Any, tuple[_Worker | None, bool]] = {self.calls.fd: (None, False)}
        control = self.plan.control.fileno() if self.plan.control is not None else None
        if control is not None and self.hard_stop_at is None:
            handles[control] = (None, True)
        answered = False
        for worker in self.workers:
            if worker.channel.pending():
                timeout = 0.0  # frames left from a capped read
            handles[worker.channel.fd] = (worker, True)
            handles[worker.process.sentinel] = (worker, False)
        # One poll set kept across waits, changed only where the descriptors did
        # (multiprocessing.connection.wait built a selector of ~33 each time:
        # about 0.1 ms a wait, several waits a device in a fan-out).
        for fd in self._polled - handles.keys():
            self._poll.unregister(fd)
        for fd in handles.keys() - self._polled:
            self._poll.register(fd, select.POLLIN)
        self._polled = set(handles)
        for ready, _ in self._poll.poll(math.ceil(timeout * 1000)):
            owner, is_conn = handles[ready]
            if owner is None and is_conn:
                assert self.plan.control is not None
                self.plan.control.read()
            elif owner is None:
                self._answer_calls()
                answered = True
            elif owner not in self.workers:
                continue
            elif is_conn:
                self._read(owner)
            elif not owner.channel.pending():
                if owner.process.poll() is None:
                    continue  # news of a start, not of an end (a zygote's pid)
                self._read(owner)
                if owner in self.workers:
                    self._on_death(owner)
        # Frames a capped read left behind, from channels not readable again.
        for worker in [w for w in self.workers if w.channel.pending()]:
            self._read(worker)
        if not answered and self.calls.next_wake() <= time.monotonic():
            self._answer_calls()

    def _answer_calls(self) -> None:
        by_call = {w.call: w for w in self.workers if w.call is not None}
        for token, answer in self.calls.completed():
            worker = by_call.get(token)
            if worker is None:
                continue  # its attempt ended (timed out, killed) while the device answered
            worker.call = None
            try:
                worker.channel.write(answer)
            except BlockingIOError:
                # It is not reading its answer: a wedged or hostile process.
                self._on_protocol_error(worker, ProtocolError("it does not read its answers"))
            except OSError:
                self._on_death(worker)

    def _read(self, worker: _Worker) -> None:
        """Act on the frames that arrived, at most a bounded batch: the loop then
        looks at its clocks again, however fast a process writes."""
        try:
            for frame in worker.channel.read():
                self._on_frame(worker, check_task_frame(frame))
                if worker not in self.workers:
                    return
        except ProtocolError as exc:
            self._on_protocol_error(worker, exc)
        except (EOFError, OSError):
            self._on_death(worker)


def make_scratch_root() -> Path:
    """A run's folder for its task processes' private ones: 0711, so each can
    reach only its own."""
    root = Path(tempfile.mkdtemp(prefix="mayfly-scratch-"))
    root.chmod(0o711)
    return root


def _described(device: Device) -> dict[str, Any]:
    """What a task process is told of its device: no address (it reaches the
    device only through this coordinator)."""
    return {"id": device.id, "labels": device.labels, "capabilities": list(device.capabilities)}


def _output(text: str | None) -> Any:
    """A device's output, from the JSON text its task process sent."""
    if text is None:
        raise ProtocolError("a success without its output")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"output is not JSON a result can hold: {str(exc)[:80]}") from exc


def run_devices(plan: RunPlan, on_progress: ProgressFn | None = None) -> list[DeviceResult]:
    """Run the plan; one :class:`DeviceResult` per device (skipped ones first)."""
    return run_plan(plan, on_progress)[0]


def run_plan(
    plan: RunPlan, on_progress: ProgressFn | None = None
) -> tuple[list[DeviceResult], str | None]:
    """Run the plan: one :class:`DeviceResult` per device (skipped ones first),
    and why the rollout aborted, if it did."""
    run = _Run(plan, on_progress)
    results = run.run()
    return results, run.aborted
