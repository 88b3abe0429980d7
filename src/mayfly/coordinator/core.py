"""The coordinator core: one request in, one result (or rejection) out.

Entry points (the Knative function, job mode, the local runtime) decode a
request, call :meth:`Coordinator.handle`, and deliver what it returns. The
core never raises for a bad request: every way a request can be wrong ends
as a ``task.rejected`` event that says why.

A request over more devices than the shard size, when the caller can publish
requests, is not run here: it comes back :class:`Sharded`, cut into requests
of its own (:func:`~mayfly.events.shard_request`), each for a coordinator of
its own.

A scheduled request (``rollout.schedule``) found outside its schedule is not
run either: it comes back :class:`Deferred`, with when it may start; one whose
window closes mid-run comes back so too, once what had started ended, its
other devices left to a later coordinator (the checkpoints say which ended).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol, overload

from mayfly import sandbox
from mayfly.coordinator.pacing import run_budget_s, share_of
from mayfly.coordinator.params import validate_params, with_defaults
from mayfly.coordinator.progress import ended_before
from mayfly.coordinator.runner import (
    DeviceProgress,
    Prestarted,
    RunControl,
    RunPlan,
    TaskStarter,
    run_plan,
)
from mayfly.coordinator.schedule import Deferred, closes_at, opens_at
from mayfly.coordinator.worker import CancelFlag, WorkerSpec
from mayfly.devices import Device, DeviceDriver, Inventory
from mayfly.errors import InventoryError, MayflyError
from mayfly.events import (
    CoordinatorInfo,
    DeviceResult,
    DeviceStatus,
    OverallStatus,
    PackageRef,
    Schedule,
    TaskCompleted,
    TaskProgress,
    TaskRejected,
    TaskRequest,
    Timings,
    rejection_for,
    shard_request,
)
from mayfly.packages import FetchedPackage, PackageRepository
from mayfly.packages.manifest import Limits
from mayfly.settings import DEFAULT_MAX_PROCESSES

__all__ = [
    "Checkpoints",
    "Coordinator",
    "CoordinatorOptions",
    "Deferred",
    "Sharded",
    "overall_status",
    "split_by_capability",
]

_LOG = logging.getLogger("mayfly.coordinator")


@dataclass(frozen=True)
class CoordinatorOptions:
    """Knobs of one coordinator instance."""

    cache_dir: Path
    mode: str = "job"
    max_processes: int = DEFAULT_MAX_PROCESSES
    """Cap on task processes at once, whatever the package asks for."""
    retry_backoff_s: float = 0.2
    instance_id: str = field(default_factory=lambda: _instance_id())
    shard_size: int | None = None
    """Devices one coordinator runs at most before a request is sharded (a
    request's ``rollout.shard_size`` wins); None: only requests that ask."""


@dataclass(frozen=True)
class Sharded:
    """A request too large for one coordinator, cut into shards to publish."""

    request: TaskRequest
    shards: tuple[TaskRequest, ...]


def _instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def overall_status(results: list[DeviceResult], canceled: bool = False) -> OverallStatus:
    """``succeeded`` when every device did, ``failed`` when none did, else
    ``partial``; ``canceled`` when the request was, unless every device had
    succeeded by the time the cancel took effect (what happened is the word)."""
    ok = sum(1 for r in results if r.status is DeviceStatus.SUCCEEDED)
    if canceled and not (results and ok == len(results)):
        return OverallStatus.CANCELED
    if results and ok == len(results):
        return OverallStatus.SUCCEEDED
    return OverallStatus.PARTIAL if ok else OverallStatus.FAILED


class Checkpoints(Protocol):
    """Reads back the progress reports of a request's earlier coordinators."""

    def reports_of(self, request: TaskRequest) -> Iterable[TaskProgress]:
        """Every progress report of ``request`` (or a shard's, of its request) in
        the log, oldest first.

        Raises:
            MayflyError: the log cannot be read.
        """
        ...


class Coordinator:
    """Runs task requests: fetch and verify, validate, fan out, report."""

    def __init__(
        self,
        repository: PackageRepository,
        inventory: Callable[[], Inventory],
        driver_factory: Callable[[], DeviceDriver],
        options: CoordinatorOptions,
        *,
        starter: TaskStarter | None = None,
    ) -> None:
        self.repository = repository
        self._inventory = inventory
        self._driver_factory = driver_factory
        self.options = options
        self.starter = starter
        """Where task processes come from (a zygote); by default forked from here."""
        self.prestarted: Prestarted | None = None
        """A task process started for the next request before its plan (the warm
        parent's); used if it fits the plan, else killed when the request ends."""
        self._cancel = CancelFlag()
        self.control: RunControl | None = None
        """Where a cancel of the request it runs may come from, with a grace
        period (the runtime that handed it over); set before :meth:`handle`."""
        self.checkpoints: Checkpoints | None = None
        """Where a paced rollout's earlier checkpoints are read from (the log)."""

    def renewed(self) -> Coordinator:
        """The same wiring under a new instance id, for a freshly forked process
        (a task process started for its request goes with it)."""
        renewed = Coordinator(
            self.repository,
            self._inventory,
            self._driver_factory,
            dataclasses.replace(self.options, instance_id=_instance_id()),
            starter=self.starter,
        )
        renewed.prestarted, self.prestarted = self.prestarted, None
        renewed.checkpoints = self.checkpoints
        return renewed

    def warm(self) -> None:
        """Load what every request needs (the inventory, the sandbox's fixed part),
        so that processes forked from this one inherit it. Re-reads only an
        inventory that changed."""
        sandbox.prepare()
        self._inventory()

    def cancel(self) -> None:
        """Stop the running request: running devices end ``canceled``. Signal-safe."""
        self._cancel.set()

    @overload
    def handle(
        self,
        request: TaskRequest,
        *,
        received_at: datetime | None = None,
        on_progress: Callable[[DeviceProgress], None] | None = None,
        shard: Literal[False] = False,
    ) -> TaskCompleted | TaskRejected | Deferred: ...

    @overload
    def handle(
        self,
        request: TaskRequest,
        *,
        received_at: datetime | None = None,
        on_progress: Callable[[DeviceProgress], None] | None = None,
        shard: bool,
    ) -> TaskCompleted | TaskRejected | Sharded | Deferred: ...

    def handle(
        self,
        request: TaskRequest,
        *,
        received_at: datetime | None = None,
        on_progress: Callable[[DeviceProgress], None] | None = None,
        shard: bool = False,
    ) -> TaskCompleted | TaskRejected | Sharded | Deferred:
        """Run one request to completion and describe what happened.

        Args:
            shard: the caller can publish shards: a request over the shard size
                comes back :class:`Sharded` (checked, not run) instead.
        """
        try:
            return self._handle(request, received_at or datetime.now(UTC), on_progress, shard)
        finally:
            if self.prestarted is not None:  # rejected, or its plan did not fit it
                self.prestarted.discard()
                self.prestarted = None

    def _handle(
        self,
        request: TaskRequest,
        received_at: datetime,
        on_progress: Callable[[DeviceProgress], None] | None,
        shard: bool,
    ) -> TaskCompleted | TaskRejected | Sharded | Deferred:
        try:
            fetched, devices = self.preflight(request)
            # A continuous request runs whole: its targets change from run to run.
            continuous = request.rollout is not None and request.rollout.continuous is not None
            size = self._shard_size(request) if shard and not continuous else None
            if size is not None and len(devices) > size:
                ids = [device.id for device in devices]
                shards = shard_request(request, ids, size, version=fetched.manifest.version)
                if len(shards) > 1:
                    return Sharded(request, shards)
            package_dir = fetched.materialise(self.options.cache_dir)
        except MayflyError as exc:
            # rejection_for derives the code: unknown task or device, params, integrity.
            return rejection_for(exc, request.cloudevent_attributes())
        started_at = datetime.now(UTC)
        schedule = request.rollout.schedule if request.rollout else None
        opens = opens_at(schedule, started_at) if schedule is not None else started_at
        if opens is not None and opens > started_at:
            return Deferred(request, opens, f"its schedule opens at {opens.isoformat()}")
        runnable, skipped = split_by_capability(devices, fetched.manifest.capabilities)
        earlier = self._earlier(request, runnable)
        plan = self._plan(request, fetched, package_dir, runnable, skipped, earlier)
        results, aborted = run_plan(plan, on_progress)
        finished_at = datetime.now(UTC)
        if any(r.status is DeviceStatus.QUEUED for r in results):
            # Held by the schedule: its window closed before they started.
            assert schedule is not None
            opens = opens_at(schedule, finished_at)
            if opens is not None and aborted is None and not self._cancel.is_set():
                _LOG.warning(
                    "%s: its window closed; the devices not started wait until %s",
                    request.id,
                    opens.isoformat(),
                )
                return Deferred(request, opens, f"its next window opens at {opens.isoformat()}")
            results = [_schedule_ended(r, schedule.not_after) for r in results]
        elif (again := self._again_at(request, finished_at, aborted)) is not None:
            return Deferred(request, again, f"it looks for new devices at {again.isoformat()}")
        first_start = min((r.started_at for r in results if r.started_at), default=None)
        cold_start_ms = (first_start - received_at).total_seconds() * 1000 if first_start else None
        m = fetched.manifest
        return TaskCompleted(
            request_id=request.id,
            request_source=request.source,
            task=request.task,
            priority=request.priority,
            traceparent=request.traceparent,
            tracestate=request.tracestate,
            package=PackageRef(name=m.name, version=m.version, digest=fetched.digest),
            status=overall_status(results, self._cancel.is_set()),
            devices=tuple(results),
            aborted=aborted,
            shard=request.shard,
            timings=Timings(
                published_at=request.time,
                received_at=received_at,
                started_at=started_at,
                finished_at=finished_at,
                cold_start_ms=max(0.0, cold_start_ms) if cold_start_ms is not None else None,
            ),
            coordinator=CoordinatorInfo(
                id=self.options.instance_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                mode=self.options.mode,
            ),
        )

    def _again_at(
        self, request: TaskRequest, now: datetime, aborted: str | None
    ) -> datetime | None:
        """When a continuous request looks for new devices next (None: it ends
        now, its schedule over, or it aborted or was canceled)."""
        rollout = request.rollout
        if rollout is None or rollout.continuous is None or aborted or self._cancel.is_set():
            return None
        later = now + timedelta(seconds=rollout.continuous.every_s)
        if rollout.schedule is not None:
            opens = opens_at(rollout.schedule, later)
            if opens is None:
                return None
            later = opens
        if request.deadline is not None and later >= request.deadline:
            return None
        return later

    def preflight(self, request: TaskRequest) -> tuple[FetchedPackage, list[Device]]:
        """The checks a request must pass before any device is touched, made
        without running it: its package resolved, fetched and verified, its
        params against the package's schema, its targets in the inventory.

        ``mayfly publish`` makes them for fast feedback; the coordinator makes
        them again when the request runs, and its rejection is the final word.

        Raises:
            MayflyError: what the coordinator would reject the request for.
        """
        fetched = self.repository.fetch(request.task, request.version or request.channel)
        validate_params(fetched.manifest, dict(request.params))
        return fetched, self._targets(request)

    def parallelism(self, request: TaskRequest, limits: Limits, devices: int) -> int:
        """Devices this coordinator runs at once of ``request``, over ``devices``."""
        parallel = min(limits.max_parallel, self.options.max_processes, max(1, devices))
        rollout = request.rollout
        if rollout and rollout.max_parallel:
            parallel = min(parallel, rollout.max_parallel)
        return parallel

    def shard_size_of(self, request: TaskRequest) -> int | None:
        """Devices one coordinator runs of ``request`` at most, or None: whole."""
        return self._shard_size(request)

    def _shard_size(self, request: TaskRequest) -> int | None:
        if request.shard is not None:
            return None  # a shard is never cut again
        if request.rollout is not None and request.rollout.shard_size is not None:
            return request.rollout.shard_size
        return self.options.shard_size

    def _earlier(self, request: TaskRequest, devices: list[Device]) -> dict[str, DeviceResult]:
        """The devices of a paced rollout that an earlier coordinator of it ended
        (it died, or its runtime did), read back from its checkpoints."""
        rollout = request.rollout
        if self.checkpoints is None or rollout is None or not rollout.resumable:
            return {}
        try:
            ended = ended_before(self.checkpoints.reports_of(request), request.id)
        except MayflyError as exc:
            # Every device runs again: their idempotency keys make that safe.
            _LOG.warning("%s: checkpoints not read, every device runs: %s", request.id, exc)
            return {}
        ids = {device.id for device in devices}
        earlier = {d: r for d, r in ended.items() if d in ids}
        if earlier:
            _LOG.warning(
                "%s: going on after an earlier coordinator: %d of %d devices ended already",
                request.id,
                len(earlier),
                len(ids),
            )
        return earlier

    def targets(self, request: TaskRequest) -> list[Device]:
        """The devices ``request`` targets, from the inventory.

        Raises:
            MayflyError: the inventory cannot be read, or no device matches.
        """
        return self._targets(request)

    def _targets(self, request: TaskRequest) -> list[Device]:
        devices = self._inventory().resolve(request.devices, request.selector)
        continuous = request.rollout is not None and request.rollout.continuous is not None
        if not devices and not continuous:  # a continuous one waits for its devices
            raise InventoryError(f"no device matches selector {dict(request.selector)}")
        return devices

    def _plan(
        self,
        request: TaskRequest,
        fetched: FetchedPackage,
        package_dir: Path,
        devices: list[Device],
        skipped: dict[str, str],
        earlier: dict[str, DeviceResult],
    ) -> RunPlan:
        limits = fetched.manifest.limits
        rollout = request.rollout
        parallel = self.parallelism(request, fetched.manifest.limits, len(devices))
        deadline = time.monotonic() + run_budget_s(request, limits.timeout_s, len(devices))
        if request.deadline is not None:
            left = (request.deadline - datetime.now(UTC)).total_seconds()
            deadline = min(deadline, time.monotonic() + max(0.0, left))
        starts_until = _starts_until(rollout.schedule if rollout else None)
        if rollout and rollout.schedule and rollout.schedule.at_end == "cancel":
            ends = rollout.schedule.not_after
            if ends is not None:  # what runs then is stopped too
                left = (ends - datetime.now(UTC)).total_seconds()
                deadline = min(deadline, time.monotonic() + max(0.0, left))
        spec = WorkerSpec(
            # The published request's id: a shard's devices see the same
            # idempotency keys as if one coordinator had run all of it.
            request_id=request.root_id,
            package_dir=package_dir,
            entrypoint=fetched.manifest.entrypoint,
            memory_mb=limits.memory_mb,
            params=with_defaults(fetched.manifest, dict(request.params)),
            cpu_seconds=max(1, math.ceil(limits.timeout_s)),
            cancel=self._cancel,
        )
        prestarted, self.prestarted = self.prestarted, None
        if prestarted is not None and not _fits(prestarted.spec, spec):
            prestarted.discard()  # another version than the warm parent saw, say
            prestarted = None
        if prestarted is not None:  # its cancel flag and scratch root are the run's
            self._cancel = prestarted.spec.cancel
            spec = dataclasses.replace(
                spec, cancel=self._cancel, scratch_root=prestarted.spec.scratch_root
            )
        return RunPlan(
            spec=spec,
            devices=devices,
            driver_factory=self._driver_factory,
            skipped=skipped,
            parallel=parallel,
            device_timeout_s=limits.device_timeout_s,
            retries=limits.retries,
            deadline=deadline,
            max_failure_ratio=rollout.max_failure_ratio if rollout else None,
            retry_backoff_s=self.options.retry_backoff_s,
            starter=self.starter,
            prestarted=prestarted,
            request_source=request.source,
            control=self.control,
            abort=rollout.abort if rollout else None,
            pace=rollout,
            pace_share=share_of(request),
            earlier=earlier,
            starts_until=starts_until,
            checkpoint=rollout is not None and rollout.resumable,
        )


def _starts_until(schedule: Schedule | None) -> float:
    """``time.monotonic()`` from which no device starts: the open stretch of
    the schedule (open now) ends (inf: it never does)."""
    if schedule is None:
        return math.inf
    now = datetime.now(UTC)
    closes = closes_at(schedule, now)
    if closes is None:
        return math.inf
    return time.monotonic() + max(0.0, (closes - now).total_seconds())


def _schedule_ended(result: DeviceResult, not_after: datetime | None) -> DeviceResult:
    """A device its schedule held that can never start now: skipped."""
    if result.status is not DeviceStatus.QUEUED:
        return result
    when = f" at {not_after.isoformat()}" if not_after is not None else ""
    return result.model_copy(
        update={"status": DeviceStatus.SKIPPED, "error": f"the schedule ended{when}"}
    )


def _fits(started: WorkerSpec, planned: WorkerSpec) -> bool:
    """Whether a task process started for ``started`` can run ``planned``."""
    fields = ("request_id", "package_dir", "entrypoint", "memory_mb", "cpu_seconds")
    return all(getattr(started, f) == getattr(planned, f) for f in fields)


def split_by_capability(
    devices: list[Device], required: tuple[str, ...]
) -> tuple[list[Device], dict[str, str]]:
    runnable: list[Device] = []
    skipped: dict[str, str] = {}
    for device in devices:
        missing = [c for c in required if c not in device.capabilities]
        if missing:
            skipped[device.id] = f"device lacks capabilities: {', '.join(missing)}"
        else:
            runnable.append(device)
    return runnable, skipped
