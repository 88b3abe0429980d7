"""Fan-out: run a package on many devices in task processes, bounded and timed.

The coordinator's loop is single-threaded: it forks task processes (at most
the allowed parallelism), hands each one device at a time over a pipe, and
waits on all pipes and process sentinels at once. That keeps three promises
without any thread:

- a device attempt that overruns its per-device timeout is ended by killing
  its task process (package code cannot ignore that) and recorded as
  ``timed_out``; a replacement process takes the next device;
- a task process that dies (memory, CPU limit, a crash) fails only the
  device it was running;
- failed attempts are retried up to the manifest's limit with backoff, and
  the request's own deadline and failure budget stop the rest cleanly.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from mayfly.coordinator.worker import WorkerSpec, worker_main
from mayfly.devices import Device
from mayfly.events import DeviceResult, DeviceStatus

__all__ = ["DeviceProgress", "RunPlan", "run_devices"]

_FORK = multiprocessing.get_context("fork")
ProgressFn = Callable[["DeviceProgress"], None]


@dataclass(frozen=True)
class DeviceProgress:
    """A progress or status change of one device, for live displays."""

    device_id: str
    status: DeviceStatus
    percent: float = 0.0
    message: str = ""
    attempt: int = 0


@dataclass(frozen=True)
class RunPlan:
    """How to run one request's package over its devices."""

    spec: WorkerSpec
    devices: list[Device]
    skipped: dict[str, str] = field(default_factory=dict)
    """Devices not run at all, with the reason (e.g. a missing capability)."""
    parallel: int = 1
    device_timeout_s: float = 30.0
    retries: int = 0
    deadline: float = math.inf
    """``time.monotonic()`` after which nothing new starts and running attempts end."""
    max_failure_ratio: float | None = None
    retry_backoff_s: float = 0.2


@dataclass
class _Device:
    device: Device
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: DeviceStatus = DeviceStatus.QUEUED
    output: Any = None
    error: str | None = None

    def result(self) -> DeviceResult:
        return DeviceResult(
            device_id=self.device.id,
            status=self.status,
            started_at=self.started_at,
            finished_at=self.finished_at,
            attempts=self.attempts,
            output=self.output,
            error=self.error,
        )


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    job: _Device | None = None
    job_deadline: float = math.inf


def _now() -> datetime:
    return datetime.now(UTC)


class _Run:
    def __init__(self, plan: RunPlan, on_progress: ProgressFn | None) -> None:
        self.plan = plan
        self.on_progress = on_progress or (lambda _p: None)
        self.states = {d.id: _Device(d) for d in plan.devices}
        # (ready_at, sequence, device): retries wait for their backoff.
        self.queue: list[tuple[float, int, _Device]] = []
        self.seq = itertools.count()
        for state in self.states.values():
            heapq.heappush(self.queue, (0.0, next(self.seq), state))
        self.workers: list[_Worker] = []
        self.failed = 0
        self.finished = 0
        self.import_error: str | None = None

    # -- process management --------------------------------------------------

    def _spawn(self) -> None:
        parent, child = _FORK.Pipe()
        process = _FORK.Process(
            target=worker_main, args=(child, self.plan.spec, os.getpid()), daemon=True
        )
        process.start()
        child.close()
        self.workers.append(_Worker(process, parent))

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        if kill and worker.process.is_alive():
            os.kill(worker.process.pid or 0, signal.SIGKILL)
        else:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(("stop",))
        worker.process.join(timeout=5)
        worker.conn.close()
        self.workers.remove(worker)

    # -- device outcomes -----------------------------------------------------

    def _finish(
        self, state: _Device, status: DeviceStatus, *, output: Any = None, error: str | None = None
    ) -> None:
        state.status = status
        state.output = output
        state.error = error
        state.finished_at = _now()
        self.finished += 1
        if status is not DeviceStatus.SUCCEEDED:
            self.failed += 1
        self.on_progress(
            DeviceProgress(
                state.device.id,
                status,
                100.0 if status is DeviceStatus.SUCCEEDED else 0.0,
                error or "",
                state.attempts,
            )
        )

    def _attempt_failed(self, state: _Device, status: DeviceStatus, error: str) -> None:
        if state.attempts <= self.plan.retries and time.monotonic() < self.plan.deadline:
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

    def _over_failure_budget(self) -> bool:
        ratio = self.plan.max_failure_ratio
        return ratio is not None and self.failed > ratio * len(self.states)

    def _skip_queued(self, status: DeviceStatus, reason: str) -> None:
        while self.queue:
            _, _, state = heapq.heappop(self.queue)
            if state.attempts:
                # Waiting for a retry: its own failure is the story, not the skip.
                self._finish(state, DeviceStatus.FAILED, error=f"{state.error}; {reason}")
            else:
                self._finish(state, status, error=reason)

    # -- the loop --------------------------------------------------------------

    def _dispatch(self) -> None:
        # Fork what the pending work can use, all at once: a task process
        # costs a few milliseconds, and idle ones are never kept.
        want = min(self.plan.parallel, self._pending())
        while len(self.workers) < want:
            self._spawn()
        now = time.monotonic()
        idle = [w for w in self.workers if w.ready and w.job is None]
        while idle and self.queue and self.queue[0][0] <= now:
            _, _, state = heapq.heappop(self.queue)
            worker = idle.pop()
            state.attempts += 1
            state.status = DeviceStatus.RUNNING
            if state.started_at is None:
                state.started_at = _now()
            worker.job = state
            worker.job_deadline = min(now + self.plan.device_timeout_s, self.plan.deadline)
            worker.conn.send(
                ("run", state.device.model_dump_json(), state.attempts, worker.job_deadline)
            )
            self.on_progress(
                DeviceProgress(state.device.id, DeviceStatus.RUNNING, 0.0, "", state.attempts)
            )

    def _pending(self) -> int:
        return len(self.queue) + sum(1 for w in self.workers if w.job is not None)

    def _on_message(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "import_failed":
            self.import_error = f"cannot load entrypoint: {message[1]}"
        elif kind == "progress" and worker.job is not None:
            _, device_id, percent, text = message
            self.on_progress(
                DeviceProgress(device_id, DeviceStatus.RUNNING, percent, text, worker.job.attempts)
            )
        elif kind == "done" and worker.job is not None:
            _, _, ok, output_json, error = message
            state, worker.job, worker.job_deadline = worker.job, None, math.inf
            if ok:
                self._finish(state, DeviceStatus.SUCCEEDED, output=json.loads(output_json))
            else:
                self._attempt_failed(state, DeviceStatus.FAILED, error)

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
        try:
            self._loop()
        finally:
            for worker in list(self.workers):
                self._retire(worker, kill=worker.job is not None)
        results = []
        for device_id, reason in self.plan.skipped.items():
            results.append(
                DeviceResult(device_id=device_id, status=DeviceStatus.SKIPPED, error=reason)
            )
        results.extend(state.result() for state in self.states.values())
        return results

    def _loop(self) -> None:
        while self.queue or any(w.job is not None for w in self.workers):
            if self.import_error is not None:
                self._skip_queued(DeviceStatus.FAILED, self.import_error)
                return
            if self.plan.spec.is_canceled():
                self._stop_all(DeviceStatus.CANCELED, "request canceled")
                return
            if time.monotonic() >= self.plan.deadline:
                self._enforce_deadlines()
                self._skip_queued(DeviceStatus.SKIPPED, "request deadline passed before start")
                continue
            if self._over_failure_budget():
                self._skip_queued(
                    DeviceStatus.SKIPPED,
                    f"skipped: failures exceeded max_failure_ratio {self.plan.max_failure_ratio}",
                )
            self._dispatch()
            self._wait()
            self._enforce_deadlines()

    def _stop_all(self, status: DeviceStatus, reason: str) -> None:
        for worker in list(self.workers):
            if worker.job is not None:
                state, worker.job = worker.job, None
                self._retire(worker, kill=True)
                self._finish(state, status, error=reason)
        self._skip_queued(status, reason)

    def _wait(self) -> None:
        now = time.monotonic()
        wake = [w.job_deadline for w in self.workers if w.job is not None]
        # A queued retry only matters when a ready process could take it;
        # otherwise the next event is a message ("ready", "done") anyway.
        if self.queue and any(w.ready and w.job is None for w in self.workers):
            wake.append(self.queue[0][0])
        wake.append(self.plan.deadline)
        timeout = max(0.0, min(min(wake) - now, 0.5))
        handles: dict[Any, tuple[_Worker, bool]] = {}
        for worker in self.workers:
            handles[worker.conn] = (worker, True)
            handles[worker.process.sentinel] = (worker, False)
        if not handles:
            time.sleep(min(timeout, 0.05))
            return
        for ready in multiprocessing.connection.wait(list(handles), timeout):
            worker, is_conn = handles[ready]
            if worker not in self.workers:
                continue
            if is_conn:
                try:
                    while worker.conn.poll():
                        self._on_message(worker, worker.conn.recv())
                except (EOFError, OSError):
                    self._on_death(worker)
            elif not worker.conn.poll():
                self._on_death(worker)


def run_devices(plan: RunPlan, on_progress: ProgressFn | None = None) -> list[DeviceResult]:
    """Run the plan; one :class:`DeviceResult` per device (skipped ones first)."""
    return _Run(plan, on_progress).run()
