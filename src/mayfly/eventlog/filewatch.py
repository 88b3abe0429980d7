"""A wake-up on writes to one file, from the kernel (inotify), for waiting readers.

The SQLite log has no server to push "a record arrived": without this, a
waiting reader asks the file every few milliseconds, which is most of an idle
runtime's CPU. inotify reports every write to the database or its WAL,
whichever process makes it, on a descriptor that ``select`` can wait on.
Three syscalls through ctypes (the standard library has no binding); where
inotify is missing :func:`watch` gives None and readers poll as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
from pathlib import Path

__all__ = ["FileWatch", "watch"]

_IN_MODIFY, _IN_MOVED_TO, _IN_CREATE, _IN_Q_OVERFLOW = 0x2, 0x80, 0x100, 0x4000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class FileWatch:
    """Readable (see :meth:`fileno`) once ``path`` or a file named after it (its
    ``-wal`` and ``-journal``) was written, created or moved into place."""

    def __init__(self, fd: int, prefix: bytes) -> None:
        self._fd = fd
        self._prefix = prefix

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> bool:
        """Read what is pending; whether any of it was about the watched file.

        Drain *before* reading the file, never after: a write that lands between
        the read and the next wait is then still pending, so no wake-up is lost.
        """
        seen = False
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return seen
            except OSError:
                return True  # the watch is broken: tell the caller to look
            at = 0
            while at + _EVENT.size <= len(data):
                _, mask, _, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW or name.startswith(self._prefix):
                    seen = True

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a write to the file; whether one came."""
        if self.drain():
            return True
        if select.select([self._fd], [], [], max(0.0, timeout_s))[0]:
            return self.drain()
        return False

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def watch(path: Path) -> FileWatch | None:
    """A watch on ``path`` and its SQLite companions; None without inotify.

    The folder is watched, not the file: SQLite creates, truncates and deletes
    its ``-wal`` file as it goes, and a watch on the folder sees all of that.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    folder = os.fsencode(path.parent if str(path.parent) else Path("."))
    if add(fd, folder, _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO) < 0:
        os.close(fd)
        return None
    return FileWatch(fd, os.fsencode(path.name))
