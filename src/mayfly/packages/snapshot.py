"""Metadata snapshots of an extracted package tree: a cheap "unchanged since checked".

Hashing every file of a cached package before each use is what makes a
rewritten cache harmless, and it costs a millisecond or more per request. A
snapshot lets the next use skip it: after a full check passed, the metadata
of every entry (path, type and mode, owner, link count, size, device and
inode, mtime and ctime, folders included) is kept; a later walk that finds
exactly the same metadata finds the same bytes, and any difference sends the
caller back to the full check.

Why that is sound: the kernel sets an inode's ctime to the current time on
every change to it (a write or truncate, a chmod or chown, a rename, a link
count change, and a utime call that puts an mtime back), and no call sets
ctime from user space (only moving the system clock does, which takes
CAP_SYS_TIME). Adding, removing or renaming an entry changes its folder's
ctime too, and a replaced entry is another inode. So an entry whose ctime is
the recorded one has not changed since it was recorded, provided the change
could not have happened in the same timestamp tick as the recording: the
"racy git" problem. Timestamps come from the kernel's coarse clock, cut to
the file system's granularity, so a tree is recorded only once every ctime
in it is at least one granule older than a clock reading taken before the
full check began (:func:`settled`); a younger tree is simply checked in full
again next time.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

__all__ = ["Snapshot", "check_started", "settled", "snapshot_tree"]

#: path, st_mode, st_uid, st_gid, st_nlink, st_size, st_dev, st_ino, st_mtime_ns, st_ctime_ns
_Entry = tuple[str, int, int, int, int, int, int, int, int, int]
Snapshot = tuple[_Entry, ...]

#: How far the coarse clock, which file timestamps are taken from, may lag
#: the clock :func:`check_started` reads: one tick, 10 ms at HZ=100.
_CLOCK_LAG_NS = 50_000_000
_SECOND_NS = 1_000_000_000


def _entry(rel: str, st: os.stat_result) -> _Entry:
    return (
        rel,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_nlink,
        st.st_size,
        st.st_dev,
        st.st_ino,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def snapshot_tree(root: Path) -> Snapshot | None:
    """The metadata of ``root`` and everything below it, links not followed;
    None when any of it cannot be read."""
    try:
        top = os.lstat(root)
        entries = [_entry(".", top)]
        if not stat.S_ISDIR(top.st_mode):
            return tuple(entries)
        pending = [("", str(root))]
        while pending:
            rel, folder = pending.pop()
            with os.scandir(folder) as listing:
                found = sorted(listing, key=lambda e: e.name)
            for item in found:
                key = f"{rel}/{item.name}" if rel else item.name
                st = item.stat(follow_symlinks=False)
                entries.append(_entry(key, st))
                if stat.S_ISDIR(st.st_mode):
                    pending.append((key, item.path))
    except OSError:
        return None
    return tuple(entries)


def check_started() -> int:
    """The clock reading to give :func:`settled`: take it before the full check."""
    return time.time_ns() - _CLOCK_LAG_NS


def settled(snapshot: Snapshot, started_ns: int) -> bool:
    """Whether ``snapshot`` may stand for a check that began at ``started_ns``:
    every ctime in it at least one timestamp granule older, so any change made
    since the check began shows as another ctime."""
    ctimes = [entry[9] for entry in snapshot]
    granule = _granularity([*ctimes, *(entry[8] for entry in snapshot)])
    return max(ctimes) + granule <= started_ns


def _granularity(stamps: list[int]) -> int:
    """The file system's timestamp granularity, as far as these stamps show.

    Never finer than the real one, which divides every stamp: the largest
    power of ten that divides them all. Whole seconds are taken as two, for
    file systems that count in even seconds.
    """
    granule = 1
    while granule < _SECOND_NS and all(s % (granule * 10) == 0 for s in stamps):
        granule *= 10
    return 2 * _SECOND_NS if granule == _SECOND_NS else granule
