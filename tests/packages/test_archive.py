from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from mayfly.errors import PackageError, UnsafeArchiveError
from mayfly.packages import ArchiveLimits, build_package, extract_archive

from .conftest import TASKPKGS, write_package


def test_build_is_deterministic_across_mtimes_modes_and_copies(
    pkg_folder: Path, tmp_path: Path
) -> None:
    first = build_package(TASKPKGS / "firmware-update")
    for path in pkg_folder.rglob("*"):
        os.utime(path, (2_000_000_000, 2_000_000_000))
        path.chmod(0o600 if path.is_file() else 0o700)
    (pkg_folder / "firmware_update" / "__pycache__").mkdir()
    (pkg_folder / "firmware_update" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"x")
    second = build_package(pkg_folder)
    assert second.data == first.data
    assert second.digest == first.digest


def test_build_changes_when_content_changes(pkg_folder: Path) -> None:
    before = build_package(pkg_folder).digest
    with (pkg_folder / "firmware_update" / "main.py").open("a") as fh:
        fh.write("# changed\n")
    assert build_package(pkg_folder).digest != before


def test_build_keeps_exec_bit_only(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "p")
    script = folder / "tool.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    with tarfile.open(fileobj=io.BytesIO(build_package(folder).data)) as tar:
        modes = {m.name: (m.mode, m.mtime, m.uid, m.uname) for m in tar.getmembers()}
    assert modes["tool.sh"] == (0o755, 0, 0, "")
    assert modes["task.py"] == (0o644, 0, 0, "")


def test_build_refuses_symlinks(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "p")
    (folder / "link").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="not a regular file"):
        build_package(folder)


def test_build_needs_the_entrypoint_module(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "p")
    (folder / "task.py").unlink()
    with pytest.raises(PackageError, match="entrypoint module 'task' not found"):
        build_package(folder)


def test_extract_roundtrip(tmp_path: Path) -> None:
    built = build_package(TASKPKGS / "firmware-update")
    dest = extract_archive(built.data, tmp_path / "out")
    original = TASKPKGS / "firmware-update" / "firmware_update" / "main.py"
    assert (dest / "firmware_update" / "main.py").read_bytes() == original.read_bytes()


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([_file("ok.txt"), _file("/tmp/evil-abs")], "absolute path"),
        ([_file("ok.txt"), _file("../evil-dotdot")], "climbs out"),
        ([_file("a/../../evil-nested")], "climbs out"),
        ([_link("etc", "/etc")], "symbolic link"),
        ([_link("up", "../../outside")], "symbolic link"),
        ([_link("hard", "/etc/passwd", tarfile.LNKTYPE)], "hard link"),
        ([_device("null")], "device or special"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink-etc", "symlink-up", "hardlink", "device"],
)
def test_crafted_archives_are_refused_and_write_nothing(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dest = root / "pkg"
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_archive(_tar(*members), dest)
    # Nothing left behind: no target folder, no staging folder, nothing outside.
    assert list(root.iterdir()) == []
    assert not (tmp_path / "evil-dotdot").exists()
    assert not Path("/tmp/evil-abs").exists()


def test_even_a_symlink_inside_the_package_is_refused(tmp_path: Path) -> None:
    # Links are refused altogether: resolving them safely is what CVE-2025-4517 broke.
    data = _tar(_file("real.txt", b"hello"), _link("alias.txt", "real.txt"))
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_archive(data, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_decompression_bomb_is_stopped_while_inflating(tmp_path: Path) -> None:
    # 200 MiB of zeros compress to ~200 KiB; the limit is 1 MiB.
    big = tarfile.TarInfo("zeros.bin")
    big.size = 200 * 1024 * 1024
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    limits = ArchiveLimits(max_bytes=1024 * 1024, max_member_bytes=512 * 1024 * 1024)
    with pytest.raises(UnsafeArchiveError, match="expands past"):
        extract_archive(raw.getvalue(), tmp_path / "pkg", limits)
    assert not (tmp_path / "pkg").exists()


def test_member_over_size_limit(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_member_bytes=10)
    with pytest.raises(UnsafeArchiveError, match="over the 10 limit"):
        extract_archive(_tar(_file("big", b"x" * 11)), tmp_path / "pkg", limits)


def test_too_many_files(tmp_path: Path) -> None:
    members = [_file(f"f{i}") for i in range(6)]
    with pytest.raises(UnsafeArchiveError, match="more than 5 members"):
        extract_archive(_tar(*members), tmp_path / "pkg", ArchiveLimits(max_files=5))


@pytest.mark.parametrize("data", [b"", b"not gzip at all", gzip.compress(b"not a tar" * 100)])
def test_garbage_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(UnsafeArchiveError):
        extract_archive(data, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_existing_destination_is_kept(tmp_path: Path) -> None:
    built = build_package(TASKPKGS / "reboot")
    dest = extract_archive(built.data, tmp_path / "pkg")
    # Someone (a concurrent extraction of the same digest) is using this copy: a second
    # extraction must leave it as it is, not swap a new one in, and leave no staging behind.
    (dest / "in-use").write_text("mine")
    again = extract_archive(built.data, tmp_path / "pkg")
    assert again == dest
    assert (dest / "in-use").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
