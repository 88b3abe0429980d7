"""The task process: runs package code for one device at a time, in a sandbox.

A task process is forked from the coordinator, enters the sandbox
(:mod:`mayfly.sandbox`: its own session, no secrets, limits, a scratch
folder, Landlock, seccomp), lowers its address-space and CPU limits, imports
the package's entrypoint and then serves ``run`` frames from its channel.
Everything it reports is a bounded JSON frame (:mod:`mayfly.coordinator.frames`),
so a misbehaving package can only hurt itself: the coordinator kills it on a
timeout and reads its death, or a malformed frame, as that device's failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import mmap
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mayfly.coordinator.context import DeviceHandle, TaskContext
from mayfly.coordinator.frames import (
    LOG_LEVELS,
    MAX_DEPTH,
    MAX_TEXT_CHARS,
    Channel,
    ProtocolError,
    check_task_frame,
    encode,
)
from mayfly.depsdir import DEPS_DIR, provided_modules
from mayfly.errors import DeviceActionError, DeviceUnavailableError, EventError
from mayfly.jsondepth import check_depth
from mayfly.procs import die_with_parent
from mayfly.sandbox import SandboxSpec, enter

__all__ = [
    "MAX_OUTPUT_BYTES",
    "MAX_SPEC_BYTES",
    "CancelFlag",
    "WorkerSpec",
    "apply_limits",
    "load_entrypoint",
    "read_memfd",
    "worker_main",
]

#: Largest JSON output kept per device; results must fit Kafka messages.
MAX_OUTPUT_BYTES = 64 * 1024
_LOG = logging.getLogger("mayfly.task")


class CancelFlag:
    """A flag the coordinator sets and its task processes read.

    One byte of shared memory in a memfd: setting it takes no lock (so a signal
    handler may), a new one costs two syscalls where a multiprocessing Event
    (semaphores, a condition) cost about a millisecond per request, and its
    descriptor can be handed to a task process that was not forked from the
    coordinator (:mod:`mayfly.coordinator.zygote`).
    """

    def __init__(self, fd: int | None = None) -> None:
        owner = fd is None
        if fd is None:
            fd = os.memfd_create("mayfly-cancel", os.MFD_CLOEXEC)
            os.ftruncate(fd, 1)
        self._byte = mmap.mmap(fd, 1, prot=mmap.PROT_READ | (mmap.PROT_WRITE if owner else 0))
        self._fd: int | None = fd if owner else None
        if owner:
            weakref.finalize(self, os.close, fd)
        else:
            os.close(fd)  # the mapping is all a reader keeps

    def fileno(self) -> int:
        """The memfd, for a task process to map (read-only there)."""
        if self._fd is None:
            raise ValueError("a reader's flag has no descriptor to give")
        return self._fd

    def set(self) -> None:
        self._byte[0] = 1

    def is_set(self) -> bool:
        return self._byte[0] == 1


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a task process needs, fixed before it starts."""

    request_id: str
    package_dir: Path
    entrypoint: str
    """``module:function`` of the package."""
    memory_mb: int
    params: dict[str, Any]
    cpu_seconds: int
    cancel: CancelFlag
    scratch_root: Path | None = None
    """Each task process gets a private folder below this one (the runner's)."""
    params_fd: int | None = None
    """In a task process the zygote started: a memfd its coordinator fills with
    the validated params before the first ``run``, read then (so a process can
    be started, sandboxed and ready while its coordinator still checks them)."""

    def is_canceled(self) -> bool:
        return self.cancel.is_set()

    def to_json(self) -> bytes:
        """The spec for a task process started elsewhere; the flag and the params
        go as descriptors."""
        return json.dumps(
            {
                "request_id": self.request_id,
                "package_dir": str(self.package_dir),
                "entrypoint": self.entrypoint,
                "memory_mb": self.memory_mb,
                "cpu_seconds": self.cpu_seconds,
                "scratch_root": str(self.scratch_root) if self.scratch_root else None,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, cancel: CancelFlag, params_fd: int) -> WorkerSpec:
        fields = json.loads(data)
        scratch = fields.pop("scratch_root")
        return cls(
            **{**fields, "package_dir": Path(fields["package_dir"])},
            params={},
            cancel=cancel,
            scratch_root=Path(scratch) if scratch else None,
            params_fd=params_fd,
        )


def read_memfd(fd: int, limit: int) -> bytes:
    """The whole content of a memfd (from its start), at most ``limit`` bytes."""
    chunks, total, offset = [], 0, 0
    while chunk := os.pread(fd, 1 << 16, offset):
        total += len(chunk)
        if total > limit:
            raise ValueError(f"more than {limit} bytes")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


#: Largest spec or params a task process reads from its memfds (a request's
#: params are bounded by the event size, 1 MB).
MAX_SPEC_BYTES = 4 * 1024 * 1024


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def apply_limits(memory_mb: int, cpu_seconds: int) -> None:
    """A task process's memory (address space on top of what it maps now) and
    CPU-seconds limits."""
    # The forked process already maps the coordinator's address space, so the
    # package's budget is added on top of what is mapped now.
    limit = _vm_size() + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))


def _load_entrypoint(spec: WorkerSpec) -> Callable[[TaskContext], Any]:
    return load_entrypoint(spec.package_dir, spec.entrypoint)


def load_entrypoint(package_dir: Path, entrypoint: str) -> Callable[[TaskContext], Any]:
    """Import a package's ``module:function`` as a task process does: its code
    first on the path, then its dependencies, then Mayfly's environment.

    Raises:
        Exception: whatever importing the package's code raises;
            ``AttributeError`` when the module has no such function.
    """
    # The package cache is read-only and checked against the signed archive:
    # no bytecode is written into it (a stray .pyc would be code nobody signed).
    sys.dont_write_bytecode = True
    deps = package_dir / DEPS_DIR
    if deps.is_dir():
        # Its own dependencies before Mayfly's environment: a library both have
        # is imported afresh from the package's copy, whatever this process
        # (forked from one that imported it) already holds.
        for name in provided_modules(deps):
            for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
                del sys.modules[loaded]
        sys.path.insert(0, str(deps))
    sys.path.insert(0, str(package_dir))
    module_name, _, function = entrypoint.partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise AttributeError(f"{entrypoint} is not a function of {module_name}")
    return fn  # type: ignore[no-any-return]


def _describe(exc: BaseException, memory_mb: int) -> str:
    if isinstance(exc, MemoryError):
        return f"MemoryError: memory limit of {memory_mb} MB exceeded"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"[:2000]


def worker_main(fd: int, spec: WorkerSpec, coordinator_pid: int) -> None:
    """Body of a task process. Never returns an exception to the coordinator."""
    die_with_parent(coordinator_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    channel = Channel(fd)
    try:
        enter(
            SandboxSpec(
                package_dir=spec.package_dir,
                scratch_dir=(spec.scratch_root or Path(tempfile.gettempdir()))
                / f"task-{os.getpid()}",
            ),
            keep_fds={fd} if spec.params_fd is None else {fd, spec.params_fd},
        )
        apply_limits(spec.memory_mb, spec.cpu_seconds)
        _log_to(channel)
        entry = _load_entrypoint(spec)
    except BaseException as exc:
        channel.send({"t": "import_failed", "error": _describe(exc, spec.memory_mb)})
        return
    channel.send({"t": "ready"})
    try:
        while True:
            message = channel.read_blocking()
            if not isinstance(message, dict) or message.get("t") != "run":
                break
            if spec.params_fd is not None:  # filled before this first run
                params = json.loads(read_memfd(spec.params_fd, MAX_SPEC_BYTES))
                os.close(spec.params_fd)
                spec = dataclasses.replace(spec, params=params, params_fd=None)
            _run_one(
                channel,
                spec,
                entry,
                _device(message["device"]),
                int(message["attempt"]),
                time.monotonic() + float(message["remaining_s"]),
            )
    except (EOFError, BrokenPipeError, OSError):
        pass  # the coordinator went away: nothing left to report to


class _FrameHandler(logging.Handler):
    """Sends the package's ``ctx.log`` records to the coordinator as ``log`` frames:
    the coordinator tags, bounds and keeps them (a package never writes to the
    runtime's output itself)."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.INFO)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname.lower()
        frame = {
            "t": "log",
            "level": level if level in LOG_LEVELS else "info",
            "message": self.format(record)[:MAX_TEXT_CHARS],
        }
        # The coordinator went away: nothing left to report to.
        with contextlib.suppress(EOFError, BrokenPipeError, OSError):
            self.channel.send(frame)


def _log_to(channel: Channel) -> None:
    _LOG.handlers[:] = [_FrameHandler(channel)]
    _LOG.setLevel(logging.INFO)
    _LOG.propagate = False


@dataclass(frozen=True)
class _Device:
    """The device of an attempt, as the coordinator described it (id, labels,
    capabilities; how to reach it is the coordinator's business)."""

    id: str
    labels: dict[str, str]
    capabilities: tuple[str, ...]


def _device(fields: dict[str, Any]) -> _Device:
    labels = fields.get("labels") or {}
    return _Device(
        id=str(fields["id"]),
        labels={str(k): str(v) for k, v in labels.items()},
        capabilities=tuple(str(c) for c in fields.get("capabilities") or ()),
    )


def _run_one(
    channel: Channel,
    spec: WorkerSpec,
    entry: Callable[[TaskContext], Any],
    device: _Device,
    attempt: int,
    deadline: float,
) -> None:
    def progress(percent: float, message: str) -> None:
        channel.send({"t": "progress", "percent": percent, "message": message})

    ctx = TaskContext(
        device=DeviceHandle(device, _Link(channel, device.id), deadline, spec.is_canceled),
        params=spec.params,
        request_id=spec.request_id,
        attempt=attempt,
        deadline=deadline,
        report_progress=progress,
        cancel_flag=spec.is_canceled,
        logger=_LOG,
    )
    try:
        output = entry(ctx)
        text = json.dumps(output)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = _describe(exc, spec.memory_mb)
        channel.send({"t": "done", "ok": False, "output": None, "error": error})
        return
    if len(text) > MAX_OUTPUT_BYTES:
        error = f"output of {len(text)} bytes exceeds the {MAX_OUTPUT_BYTES} byte limit"
        channel.send({"t": "done", "ok": False, "output": None, "error": error})
        return
    channel.send({"t": "done", "ok": True, "output": text, "error": None})


class _Link:
    """The device of the current attempt, reached through the coordinator.

    A call is a frame; the coordinator makes it on this attempt's device and
    answers. The process has no network of its own (the sandbox refuses it
    every socket but this channel).
    """

    def __init__(self, channel: Channel, device_id: str) -> None:
        self._channel = channel
        self._device_id = device_id

    def state(self) -> dict[str, Any]:
        return self._call({"t": "call", "op": "state"})

    def action(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call({"t": "call", "op": "action", "name": name, "payload": payload})

    def _call(self, frame: dict[str, Any]) -> dict[str, Any]:
        # The coordinator's own checks, here first: a bad name or payload is the
        # package's error to handle, not a broken protocol that ends the process.
        try:
            check_task_frame(frame)
            data = encode(frame)  # TypeError for a payload that is not JSON, as json.dumps
            check_depth(data[4:], MAX_DEPTH, "payload")
        except (ProtocolError, EventError) as exc:
            raise DeviceActionError(self._device_id, f"the call cannot be sent: {exc}") from None
        self._channel.write(data)
        answer = self._channel.read_blocking()
        if not isinstance(answer, dict) or answer.get("t") != "answer":
            raise DeviceActionError(self._device_id, "the coordinator did not answer the call")
        if answer.get("ok") is True:
            value = answer.get("value")
            if isinstance(value, dict):
                return value
            raise DeviceActionError(self._device_id, "the device's answer is not an object")
        reason = str(answer.get("reason") or "no reason given")
        if answer.get("kind") == "unavailable":
            raise DeviceUnavailableError(self._device_id, reason)
        raise DeviceActionError(self._device_id, reason)
