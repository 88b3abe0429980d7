"""When a tree's metadata may stand for a full check of it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mayfly.packages.snapshot import Snapshot, check_started, settled, snapshot_tree

SECOND = 1_000_000_000


def _tree(*ctimes: int) -> Snapshot:
    return tuple((f"f{i}", 0o100444, 0, 0, 1, 1, 1, i, c, c) for i, c in enumerate(ctimes))


def test_a_tree_changed_within_a_granule_of_the_check_is_not_settled() -> None:
    started = 1_700_000_000_123_456_789
    assert settled(_tree(started - 5_000, started - 1), started)
    assert not settled(_tree(started - 5_000, started), started)
    assert not settled(_tree(started - 5_000, started + 1), started)


def test_whole_second_stamps_need_two_seconds() -> None:
    """A file system that keeps seconds only gives the same ctime to a change
    later in the same second: it must be two seconds old to tell."""
    started = 1_700_000_010 * SECOND
    assert not settled(_tree(started - SECOND), started)
    assert settled(_tree(started - 2 * SECOND), started)


def test_a_freshly_written_tree_is_not_settled(tmp_path: Path) -> None:
    started = check_started()
    (tmp_path / "a").write_bytes(b"1")
    snap = snapshot_tree(tmp_path)
    assert snap is not None
    assert not settled(snap, started)


def test_a_snapshot_shows_every_change(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(b"1")
    first = snapshot_tree(tmp_path)
    assert first is not None
    assert [e[0] for e in first] == [".", "sub", "sub/a"]
    st = (tmp_path / "sub" / "a").stat()
    time.sleep(0.05)  # past the timestamp tick of the first write
    (tmp_path / "sub" / "a").write_bytes(b"2")
    os.utime(tmp_path / "sub" / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    second = snapshot_tree(tmp_path)
    assert second is not None
    assert second != first
    (tmp_path / "sub" / "b").write_bytes(b"")
    assert snapshot_tree(tmp_path) != second
    assert snapshot_tree(tmp_path / "missing") is None
