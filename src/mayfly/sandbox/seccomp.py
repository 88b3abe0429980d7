"""A seccomp filter for task processes: no network, no new processes, no peeking at others.

Package code may open no socket but a unix one (it talks to its coordinator,
which reaches the devices for it: no address, port or protocol of any network
is open to it, UDP included). It may start threads but no process (``fork``, ``vfork``, ``clone``
without ``CLONE_THREAD``, ``execve``), so nothing it starts can outlive its
attempt; and it may not trace, read or write another process's memory, enter
or make namespaces, mount, or reach the kernel through io_uring, bpf or
perf (where seccomp cannot follow). A refused call fails with ``EPERM``
(``clone3`` with ``ENOSYS``, so the C library falls back to ``clone`` for
threads). A syscall of another ABI (32-bit entry on x86_64) kills the process.

The filter is a classic BPF program built here (libseccomp would do it too,
but it is a C library the image would have to carry for twenty instructions).
x86_64 and aarch64; elsewhere :func:`install` raises and the caller says so.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import platform

__all__ = ["compiled", "install", "supported"]

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000

# name: (x86_64, aarch64); aarch64 has no fork or vfork.
_DENIED = {
    "fork": (57, None),
    "vfork": (58, None),
    "execve": (59, 221),
    "execveat": (322, 281),
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "unshare": (272, 97),
    "setns": (308, 268),
    "mount": (165, 40),
    "keyctl": (250, 219),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
}
_CLONE = (56, 220)
_CLONE3 = (435, 435)
_SOCKET = (41, 198)
_AF_UNIX = 1
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]  # fmt: skip


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def supported() -> bool:
    return platform.machine() in _ARCHES


def _program(machine: str) -> list[tuple[int, int, int, int]]:
    column, arch = _ARCHES[machine]
    eperm = _RET_ERRNO | errno.EPERM
    code: list[tuple[int, int, int, int]] = [
        (_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, arch),
        (_RET, 0, 0, _RET_KILL_PROCESS),
        (_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        code += [(_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, eperm)]
    code += [
        (_JEQ, 0, 4, _SOCKET[column]),
        (_LD_ABS_W, 0, 0, 16),  # low half of args[0]: socket's address family
        (_JEQ, 1, 0, _AF_UNIX),
        (_RET, 0, 0, eperm),
        (_RET, 0, 0, _RET_ALLOW),
        (_JEQ, 0, 4, _CLONE[column]),
        (_LD_ABS_W, 0, 0, 16),  # low half of args[0]: clone's flags
        (_JSET, 1, 0, _CLONE_THREAD),
        (_RET, 0, 0, eperm),
        (_RET, 0, 0, _RET_ALLOW),
        (_JEQ, 0, 1, _CLONE3[column]),
        (_RET, 0, 0, _RET_ERRNO | errno.ENOSYS),
    ]
    for numbers in _DENIED.values():
        number = numbers[column]
        if number is not None:
            code += [(_JEQ, 0, 1, number), (_RET, 0, 0, eperm)]
    code.append((_RET, 0, 0, _RET_ALLOW))
    return code


@functools.cache
def compiled() -> _Program:
    """The filter for this machine, built once (a warm parent's forks inherit it).

    Raises:
        OSError: the architecture is not covered.
    """
    machine = platform.machine()
    if machine not in _ARCHES:
        raise OSError(f"no seccomp filter for {machine}")
    code = _program(machine)
    filters = (_Filter * len(code))(*(_Filter(*i) for i in code))
    return _Program(len(code), filters)  # ctypes keeps the array alive with it


def install() -> None:
    """Set ``no_new_privs`` and install the filter on this thread's process.

    Irreversible; inherited by every thread started afterwards.

    Raises:
        OSError: the architecture is not covered, or the kernel refused.
    """
    program = compiled()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
