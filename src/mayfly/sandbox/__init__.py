"""The task-process sandbox: what package code can reach, set up before it runs.

A task process is forked from its coordinator and enters the sandbox before
it imports any package code, in this order (each layer is cheap: see
``bench/cold_start.py`` and SECURITY.md):

1. **its own session** (``setsid``), so the coordinator ends the attempt with
   everything it started in one ``killpg``; and no descriptor of the
   coordinator's (event log, store, sockets) but its channel and stdio;
2. **no secrets**: the environment is replaced by a short allowlist, the
   process's original environment block (``/proc/self/environ``) is zeroed,
   and secrets the coordinator holds are wiped from the forked heap;
3. **limits**: address space and CPU (the manifest's), file size, open files,
   no core dumps;
4. **a private scratch folder** as working directory, ``HOME`` and ``TMPDIR``;
5. **no privilege**: a root process drops every capability (it keeps uid 0,
   so it can still read its package and scratch folder wherever they are,
   and Landlock, which binds root too, confines it to them);
6. **Landlock**: read-only access to the interpreter, its libraries and the
   package; read-write access to the scratch folder only; no TCP connection or
   bind at all; no signals or abstract unix sockets beyond the sandbox;
7. **seccomp**: no socket but a unix one (so no network: devices are reached
   through the coordinator), no new processes or programs, no tracing or
   reading other processes, no namespaces, mounts, io_uring, bpf or perf.

Where the kernel lacks a layer (no Landlock, another architecture for the
seccomp filter), :func:`enter` leaves it out and :class:`Applied` says so; the
coordinator records it once in its log.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mayfly.sandbox import landlock, seccomp
from mayfly.sandbox.secrets import wipe, wipe_bytes

__all__ = ["Applied", "SandboxSpec", "enter", "harmless_environment", "prepare"]

#: Variables a task process keeps; everything else (credentials included) goes.
_KEPT_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "PYTHONHASHSEED", "PYTHONIOENCODING")
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPSET = {"x86_64": 126, "aarch64": 91}
_CAP_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class SandboxSpec:
    """What one task process may use."""

    package_dir: Path
    scratch_dir: Path
    max_file_bytes: int = 64 * 1024 * 1024
    max_open_files: int = 256


@dataclass
class Applied:
    """Which layers are in force in this process."""

    layers: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _zero_environ_block() -> None:
    """Overwrite the environment the process was exec'd with (``/proc/self/environ``)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        # Fields 50 and 51 of stat(5) (env_start, env_end); [0] here is field 3.
        start, end = int(fields[47]), int(fields[48])
    except (OSError, ValueError, IndexError):
        return
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def harmless_environment() -> dict[str, str]:
    """This process's environment cut to the short allowlist a task process keeps
    (no credential, whatever the process was started with)."""
    return {k: v for k, v in os.environ.items() if k in _KEPT_ENV or k.startswith("LC_")}


def _scrub_environment(scratch: Path) -> None:
    kept = harmless_environment()
    dropped = [v for k, v in os.environb.items() if k.decode(errors="replace") not in kept]
    os.environ.clear()
    os.environ.update(kept, HOME=str(scratch), TMPDIR=str(scratch))
    # Single bytes are shared singletons in CPython: never overwrite those.
    wipe_bytes([v for v in dropped if len(v) > 1])
    _zero_environ_block()
    wipe()


def _close_inherited(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 2**31 - 1)  # close_range(2): one call, however high


def _limits(spec: SandboxSpec) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec.max_file_bytes, spec.max_file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.max_open_files, spec.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@functools.cache
def _interpreter_roots() -> tuple[Path, ...]:
    """What every task process may read: the interpreter, its libraries, time zones.

    Computed once per process tree: :func:`prepare` runs it in a warm parent, and
    every process forked from it inherits the answer.
    """
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    # Not the folder the process was started in, which `python -m` (without -P)
    # puts first on sys.path: an operator's home or project folder, keys and
    # event log included. Mayfly's own modules are imported before the sandbox.
    started_in = "" if sys.flags.safe_path else os.getcwd()
    roots |= {
        Path(p)
        for i, p in enumerate(sys.path)
        if p and os.path.isdir(p) and not (i == 0 and os.path.abspath(p) == started_in)
    }
    # Shared libraries an extension module may load, and time zone data. No
    # resolver or TLS files: the process has no network (the coordinator has).
    roots |= {Path(p) for p in ("/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/share/zoneinfo")}
    roots |= {Path("/dev/urandom"), Path("/etc/localtime")}
    return tuple(sorted(roots))


def _readable_roots(spec: SandboxSpec) -> list[Path]:
    return [*_interpreter_roots(), spec.package_dir]


def prepare() -> None:
    """Do now, once, what :func:`enter` would otherwise do in every task process.

    Call it in a process that forks coordinators (a warm parent): the
    interpreter's read set and the seccomp program are then inherited.
    """
    _interpreter_roots()
    if seccomp.supported():
        seccomp.compiled()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """Empty the effective, permitted and inheritable sets (and the ambient one).

    Why not switch to ``nobody``: the package and the scratch folder sit under
    the operator's home, which another uid usually cannot even traverse.
    """
    number = _CAPSET.get(platform.machine())
    if number is None:
        raise OSError(f"no capset syscall number for {platform.machine()}")
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = bytes(24)  # two (effective, permitted, inheritable) triples, all empty
    if libc.syscall(number, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def enter(spec: SandboxSpec, *, keep_fds: set[int]) -> Applied:
    """Put this (freshly forked) process into the sandbox. Irreversible.

    Raises:
        OSError: a layer the kernel offers could not be applied.
    """
    applied = Applied()
    os.setsid()
    _close_inherited(keep_fds | {0, 1, 2})
    applied.layers.append("session")
    spec.scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _scrub_environment(spec.scratch_dir)
    applied.layers.append("no secrets")
    _limits(spec)
    os.chdir(spec.scratch_dir)
    libc = _libc()
    if os.geteuid() == 0:
        _drop_capabilities(libc)
        applied.layers.append("no capabilities")
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    # Landlock and seccomp both need it without CAP_SYS_ADMIN; nothing exec'd
    # later (nothing can be) gains privileges from set-uid bits either.
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if landlock.abi_version() >= 1:
        abi = landlock.restrict(
            read=_readable_roots(spec),
            write=[spec.scratch_dir, Path("/dev/null")],
            connect_ports=(),  # none: the network is the coordinator's
        )
        applied.layers.append(f"landlock v{abi}")
    else:
        applied.missing.append("landlock")
    if seccomp.supported():
        seccomp.install()
        applied.layers.append("seccomp")
    else:
        applied.missing.append("seccomp")
    return applied
