"""Process-tree hygiene shared by every process Mayfly forks."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

__all__ = ["LOG_FORMAT", "child_pythonpath", "die_with_parent"]

_PR_SET_PDEATHSIG = 1
#: The folder holding the ``mayfly`` package (``src`` in a checkout).
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)
#: How Mayfly's processes log to stderr (``mayfly up``, the task zygote).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_libc: ctypes.CDLL | None = None


def die_with_parent(expected_parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    A forked child must not outlive the process that supervises it: after a
    ``kill -9`` of the runtime, an orphaned coordinator or task process would
    keep acting on devices with nobody to report to. ``expected_parent`` closes
    the race where the parent died between ``fork()`` and this call.
    """
    global _libc
    if _libc is None:
        # dlopen(NULL): the interpreter's own namespace, where libc's prctl is.
        # find_library("c") ran ldconfig in a subprocess, ~10 ms in every task
        # process a job-mode coordinator forked (it never loaded libc itself).
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def child_pythonpath(inherited: str | None) -> str:
    """``PYTHONPATH`` for a fresh interpreter (``python -m mayfly.<module>``) that
    must import this very Mayfly, installed or not, ahead of ``inherited``."""
    return os.pathsep.join([_SOURCE_ROOT, *filter(None, [inherited])])
