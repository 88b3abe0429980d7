"""Landlock: the kernel's own unprivileged file-system and network sandbox.

A process restricts itself, irreversibly, to the paths and TCP ports it names;
its descendants inherit the restriction. Three raw syscalls (no library
exists for Python), the same numbers on every Linux architecture.
See https://docs.kernel.org/userspace-api/landlock.html.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable
from pathlib import Path

__all__ = ["abi_version", "restrict"]

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2

_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_REMOVE_DIR, _REMOVE_FILE, _MAKE_CHAR, _MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_MAKE_REG, _MAKE_SOCK, _MAKE_FIFO, _MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
_MAKE_SYM, _REFER, _TRUNCATE, _IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_READ = _EXECUTE | _READ_FILE | _READ_DIR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= _REFER
    if abi >= 3:
        rights |= _TRUNCATE
    if abi >= 5:
        rights |= _IOCTL_DEV
    return rights


def abi_version() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (or it is off)."""
    found = _libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(0, int(found))


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return result


def restrict(
    *,
    read: Iterable[Path],
    write: Iterable[Path],
    connect_ports: Iterable[int] | None = None,
) -> int:
    """Allow only reading ``read``, reading and writing ``write`` and, from ABI 4,
    TCP connections to ``connect_ports`` (``None``: no network rule); from ABI 6,
    no signals or abstract unix sockets outside this sandbox.

    Paths that do not exist are skipped. Needs ``no_new_privs`` (or
    CAP_SYS_ADMIN) set first.

    Returns:
        The ABI version applied.

    Raises:
        OSError: the kernel has no Landlock, or refused the ruleset.
    """
    abi = abi_version()
    if abi < 1:
        raise OSError("this kernel has no Landlock (or it is disabled)")
    handled_fs = _fs_rights(abi)
    handled_net = (
        (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 and connect_ports is not None else 0
    )
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    if scoped:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif handled_net:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), 0), "create")
    try:
        for paths, rights in ((read, _READ), (write, handled_fs)):
            for path in paths:
                _allow_path(ruleset, path, rights & handled_fs)
        if handled_net:
            for port in sorted(set(connect_ports or ())):
                rule = ctypes.create_string_buffer(struct.pack("=QQ", _NET_CONNECT_TCP, port), 16)
                _check(_libc.syscall(_ADD_RULE, ruleset, _RULE_NET_PORT, rule, 0), "net rule")
        _check(_libc.syscall(_RESTRICT_SELF, ruleset, 0), "restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _allow_path(ruleset: int, path: Path, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # not there: nothing to allow
    try:
        if not os.path.isdir(path):
            # Rights that only make sense on directories are refused on files.
            rights &= _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        _check(_libc.syscall(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0), f"rule {path}")
    finally:
        os.close(fd)
