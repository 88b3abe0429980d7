"""Secrets this process holds, so a task process forked from it can wipe them.

A task process is a fork of its coordinator: without a wipe it would carry
the coordinator's S3 secret in its heap, where ``gc.get_objects()`` finds it.
:func:`private` takes a private copy of a secret where it enters the process
(settings), and that copy is the one the process uses;
:func:`wipe` overwrites those strings in place, in the fork only (its memory is
a copy), before any package code runs.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["private", "wipe", "wipe_bytes"]

_KNOWN: list[str] = []


def private(value: str | None) -> str | None:
    """A copy of ``value`` that no one else holds, remembered for :func:`wipe`.

    Only such a copy may be wiped in place: the caller's string may be interned
    or shared (an access key ``"mayfly"`` is the same object as every other
    ``"mayfly"`` literal), and overwriting it would corrupt the process.
    """
    if not value:
        return None
    copy = "".join(list(value))  # a new object even for one that is interned
    if copy is value:  # a one-character string: a shared singleton, never wiped
        return value
    _KNOWN.append(copy)
    return copy


def _zero(obj: str | bytes) -> None:
    # CPython keeps a compact ASCII str's characters, and a bytes object's
    # bytes, at the end of the object, followed by one NUL.
    if isinstance(obj, str) and not obj.isascii():
        return  # stored as 2- or 4-byte units at another offset: left as it is
    size = len(obj)
    ctypes.memset(id(obj) + sys.getsizeof(obj) - size - 1, 0, size)


def wipe() -> int:
    """Overwrite every remembered ASCII secret (S3 keys are) with NULs; returns how
    many were taken off the list."""
    count = 0
    while _KNOWN:
        _zero(_KNOWN.pop())
        count += 1
    return count


def wipe_bytes(values: list[bytes]) -> None:
    """Overwrite these bytes objects with NULs (the environment's raw values)."""
    for value in values:
        if type(value) is bytes and value:
            _zero(value)
