"""The warm parent's work: a coordinator built once, run in every process forked from it.

Imported by the warm parent only (:func:`mayfly.app.local.Runtime` forks it
first): the coordinator's dependencies stay out of the ``mayfly up`` process.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mayfly.app.checkpoints import LogCheckpoints
from mayfly.app.wiring import build_coordinator
from mayfly.coordinator import Coordinator, RequestPipeline
from mayfly.coordinator.pacing import run_budget_s
from mayfly.coordinator.params import validate_params
from mayfly.coordinator.progress import ProgressReporter
from mayfly.coordinator.runner import DeviceProgress, make_scratch_root
from mayfly.coordinator.worker import CancelFlag, WorkerSpec
from mayfly.coordinator.zygote import EarlyTask, TaskZygote

# The coordinator's device-call engine (httptools, ipaddress): imported once
# here, inherited by every coordinator, not imported again in each (8-12 ms on
# a fresh coordinator's path, before its first task process gets a device).
from mayfly.devices import httploop  # noqa: F401
from mayfly.errors import MayflyError, ParamsError
from mayfly.eventlog import LogRecord
from mayfly.events import MayflyEvent, TaskCompleted, TaskRequest, from_kafka, peek_attributes
from mayfly.packages import FetchedPackage, PackageRepository
from mayfly.runtime.session import Appends, RequestControl, RuntimeLink, RuntimeSink
from mayfly.settings import Settings

__all__ = ["WarmCoordinator"]

_LOG = logging.getLogger("mayfly.runtime")


@dataclass(frozen=True)
class _Prepared:
    """What the warm parent learnt of the record it is about to fork for."""

    record: LogRecord
    request: TaskRequest
    repository: PackageRepository | None
    """The repository with the request's ref resolved just before the fork."""
    digest: str | None = None
    """The digest of the package version the ref resolved to."""
    timeout_s: float | None = None
    """The package's ``limits.timeout_s``: how long the request may run."""


class WarmCoordinator:
    """Lives in the warm parent: wired once, it runs each request in a fork.

    :meth:`before_fork` refreshes the parsed inventory in the warm parent, so
    coordinators inherit it: parsing it in each coordinator instead cost
    0.14 s per request for a fleet of 2,000 devices, most of a coordinator's
    CPU (bench/pipeline.py). It also fetches, verifies and materialises the
    request's package version and checks its params once there (building the
    validator): only the first request for a version pays for them (about
    4.5 ms); every later coordinator inherits them done, with the ref the warm
    parent resolved just before the fork.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Started first: its imports run while this process does its own.
        self.zygote = TaskZygote()
        self.zygote.start()
        try:
            self.coordinator = build_coordinator(
                settings, "local", require_packages=True, starter=self.zygote
            )
            self.coordinator.repository.check()  # fail early, and warm the store's client
        except BaseException:
            self.zygote.stop()
            raise
        self._repository = self.coordinator.repository
        # The log holds the checkpoints of a paced rollout an earlier coordinator ran.
        self.coordinator.checkpoints = LogCheckpoints(settings)
        try:
            self.coordinator.warm()
        except MayflyError as exc:
            # Not fatal here: a request that needs the inventory is rejected with the reason.
            _LOG.warning("inventory not loaded yet: %s", exc)
        self.zygote.wait_ready()
        self._prepared: _Prepared | None = None
        self._early: EarlyTask | None = None
        """The task process asked for the record about to run (:meth:`_start_early`)."""
        self._digest: str | None = None
        """The package digest this (serving) coordinator runs; set on its first request."""

    def before_fork(self, record: LogRecord) -> None:
        self.zygote.restart_if_dead()
        # A file inventory is re-read only when it changed; an S3 one would cost a
        # GET per fork here, serialising every start behind it: coordinators fetch
        # that themselves.
        if not self.settings.inventory.startswith("s3://"):
            with contextlib.suppress(MayflyError):
                self.coordinator.warm()
        self._prepared = None
        self._drop_early()
        try:
            self._prepared = self._prepare(record)
        except Exception:
            # A warm-up only: the coordinator does it all again and reports what
            # fails. Whatever went wrong must not end the warm parent, and every
            # request with it.
            _LOG.exception(
                "request %s/%d@%d not prepared", record.topic, record.partition, record.offset
            )

    def _prepare(self, record: LogRecord) -> _Prepared | None:
        """Decode the request (tens of microseconds) and ready its package: on a
        version verified before, one read of the store, to resolve the ref."""
        try:
            request = from_kafka(record.headers, record.key, record.value)
        except MayflyError:
            return None  # the coordinator rejects it, with the reason
        if not isinstance(request, TaskRequest):
            return None
        ref = request.version or request.channel
        try:
            fetched = self._repository.fetch(request.task, ref)
        except MayflyError:
            return _Prepared(record, request, None)
        # The child runs the request a moment from now, as fresh a view of the
        # channel as it would get by reading it itself (forks wait for this).
        pinned = self._repository.pinned(request.task, ref, fetched.manifest.version)
        try:
            package_dir = fetched.materialise(self.coordinator.options.cache_dir)
        except MayflyError:
            pass  # the coordinator meets it again, and says so
        else:
            self._start_early(request, fetched, package_dir)
        # Run once, not only built: a validator's first use does work of its own.
        # On empty params, never the request's: a hostile value against a
        # backtracking pattern would stall this process, and every fork with it.
        # The request's own params are checked in its coordinator.
        with contextlib.suppress(ParamsError):
            validate_params(fetched.manifest, {})
        timeout_s = self._budget_of(request, fetched.manifest.limits.timeout_s)
        return _Prepared(record, request, pinned, fetched.digest, timeout_s)

    def _start_early(
        self, request: TaskRequest, fetched: FetchedPackage, package_dir: Path
    ) -> None:
        """Ask the zygote for the request's first task process now: it enters the
        sandbox and imports the package while the coordinator is forked and
        checks the params (which the process reads only at its first device)."""
        limits = fetched.manifest.limits
        spec = WorkerSpec(
            request_id=request.id,
            package_dir=package_dir,
            entrypoint=fetched.manifest.entrypoint,
            memory_mb=limits.memory_mb,
            params={},
            cpu_seconds=max(1, math.ceil(limits.timeout_s)),
            cancel=CancelFlag(),
            scratch_root=make_scratch_root(),
        )
        try:
            self._early = EarlyTask.start(self.zygote, spec)
        except OSError as exc:
            assert spec.scratch_root is not None
            shutil.rmtree(spec.scratch_root, ignore_errors=True)
            _LOG.debug("no early task process for %s: %s", request.id, exc)

    def _drop_early(self) -> None:
        if self._early is not None:
            self._early.discard()
            self._early = None

    def after_fork(self) -> None:
        if self._early is not None:
            self._early.forget()  # the coordinator's now
            self._early = None

    def close(self) -> None:
        self._drop_early()
        self.zygote.stop()

    def accepts(self, record: LogRecord) -> bool:
        """A serving coordinator runs requests of one package digest: the one it
        was forked for (a request whose package it could not ready runs here
        too, and is rejected with the reason)."""
        prepared = self._prepared
        if prepared is None or prepared.record is not record or prepared.digest is None:
            return True
        if self._digest is None:
            self._digest = prepared.digest
        if prepared.digest != self._digest:
            self._drop_early()  # it starts afresh, in a coordinator of its own
            return False
        return True

    def run(self, record: LogRecord, dequeued_at: datetime, link: Appends) -> int:
        prepared = self._prepared
        if prepared is not None and prepared.record is not record:
            prepared = None
        if self._digest is None and prepared is not None:
            self._digest = prepared.digest
        if prepared is not None and prepared.repository is not None:
            # Only in this (forked) coordinator: the warm parent keeps its own.
            self.coordinator.repository = prepared.repository
        if prepared is not None:
            self.coordinator.prestarted, self._early = self._early, None
        self._drop_early()
        timeout_s = self._timeout_of(record, prepared)
        if timeout_s is not None:
            link.deadline(timeout_s)  # else the runtime's set-up budget holds
        sink = RuntimeSink(link, self.settings.topics)

        def progress(request: TaskRequest, coordinator: str) -> ProgressReporter:
            def each(p: DeviceProgress) -> None:
                _log_progress(request.id, p)

            resumable = request.rollout is not None and request.rollout.resumable
            return ProgressReporter(
                request, coordinator, sink.emit, each=each, checkpoint=resumable
            )

        control = None
        if isinstance(link, RuntimeLink):  # a cancel of this record comes through it
            control = RequestControl(link, (record.topic, record.partition, record.offset))

        def coordinator() -> Coordinator:
            renewed = self.coordinator.renewed()
            renewed.control = control
            return renewed

        pipeline = RequestPipeline(coordinator, sink, shards=sink, progress=progress)
        try:
            # The dispatcher marks the result in the runtime's state once it is
            # durable: it appended it.
            handled = pipeline.handle(
                lambda: _decoded(record, prepared),
                lambda: peek_attributes(record.headers, record.value),
                received_at=dequeued_at,
            )
        finally:
            self.coordinator.repository = self._repository
            if self.coordinator.prestarted is not None:  # no coordinator took it
                self.coordinator.prestarted.discard()
                self.coordinator.prestarted = None
        if self._digest is None and isinstance(handled.outcome, TaskCompleted):
            self._digest = handled.outcome.package.digest  # what it ran, prepared or not
        if handled.defer_until is not None:
            link.defer(handled.defer_until)
        return int(handled.code)

    def _timeout_of(self, record: LogRecord, prepared: _Prepared | None) -> float | None:
        """The request's package ``timeout_s``; None when it cannot be known (the
        request is then rejected, quickly)."""
        if prepared is not None and prepared.timeout_s is not None:
            return prepared.timeout_s
        try:
            request = _decoded(record, prepared)
            if not isinstance(request, TaskRequest):
                return None
            fetched = self.coordinator.repository.fetch(
                request.task, request.version or request.channel
            )
        except MayflyError:
            return None
        return self._budget_of(request, fetched.manifest.limits.timeout_s)

    def _budget_of(self, request: TaskRequest, timeout_s: float) -> float:
        """How long the runtime lets ``request`` run: its package's ``timeout_s``,
        and a paced rollout's the time its pace takes besides."""
        if request.rollout is None or not request.rollout.paced:
            return float(timeout_s)
        try:
            devices = len(self.coordinator.targets(request))
        except MayflyError:
            devices = len(request.devices)
        return run_budget_s(request, timeout_s, devices)


def _decoded(record: LogRecord, prepared: _Prepared | None) -> MayflyEvent:
    if prepared is not None:
        return prepared.request  # decoded from these very bytes before the fork
    return from_kafka(record.headers, record.key, record.value)


def _log_progress(request_id: str, progress: DeviceProgress) -> None:
    # `mayfly up -v` shows these; at the default level they cost a level check.
    _LOG.info(
        "%s %s %s %.0f%% %s (attempt %d)",
        request_id,
        progress.device_id,
        progress.status,
        progress.percent,
        progress.message,
        progress.attempt,
    )
