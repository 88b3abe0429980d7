"""Hostile package archives, built at test time, against extraction and the cache.

Every archive here is one an attacker who can get a package signed (a stolen key,
a careless reviewer, a compromised build) would ship. Extraction must refuse it
naming the member, write nothing anywhere (not even the target folder), and the
CLI must say so in one line. The package cache must hand out only what the
signed archive holds, however a task process rewrote it in between.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mayfly.cli import cli
from mayfly.errors import PackageError, UnsafeArchiveError
from mayfly.packages import (
    BuiltPackage,
    FetchedPackage,
    LocalPackageStore,
    PackageRepository,
    TrustedKeys,
    build_package,
    digest_of,
    extract_archive,
    load_private_key,
    read_manifest_from_archive,
    repository,
    sign_built,
)
from mayfly.packages.archive import ArchiveEntry

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"
MANIFEST = {"name": "hostile", "version": "1.0.0", "entrypoint": "task:run"}
OUTSIDE = b"original content of a file outside the package\n"
#: mkdtemp(prefix=".extract-") in the target's parent: the folder a chain is tuned for.
STAGING_NAME_LEN = len(".extract-") + 8

Member = tuple[tarfile.TarInfo, bytes | None]


# --- archive makers ------------------------------------------------------------------


def _entry(name: str, kind: bytes, *, data: bytes | None = None, link: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if data is not None else 0
    return info, data


def _file(name: str, data: bytes = b"x = 1\n") -> Member:
    return _entry(name, tarfile.REGTYPE, data=data)


def _dir(name: str) -> Member:
    return _entry(name, tarfile.DIRTYPE)


def _symlink(name: str, target: str) -> Member:
    return _entry(name, tarfile.SYMTYPE, link=target)


def _hardlink(name: str, target: str) -> Member:
    return _entry(name, tarfile.LNKTYPE, link=target)


def _device(name: str) -> Member:
    info, data = _entry(name, tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 3  # /dev/null
    return info, data


def _tgz(*members: Member) -> bytes:
    """A gzip'd GNU tar with a valid package (manifest first) and then ``members``."""
    raw = io.BytesIO()
    # GNU format: names and link targets of any length, and raw (non-UTF-8) bytes.
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        head = (_file("manifest.json", json.dumps(MANIFEST).encode()), _file("task.py"))
        for info, data in (*head, *members):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def _chain(root: Path) -> tuple[list[Member], str]:
    """The CVE-2025-4517 chain: 16 folders with long names, each reached through a
    one-letter symlink, so that ``a/b/.../p`` only expands past PATH_MAX inside
    ``os.path.realpath`` (which then stops resolving and answers "inside"); a link
    below it climbs 16 levels back up, and ``escape`` points one level above that:
    the folder the staging folder sits in, ``root``. Returns the members and the
    name of ``escape``."""
    steps = "abcdefghijklmnop"
    staging_len = len(str(root.resolve())) + 1 + STAGING_NAME_LEN
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - staging_len - 1) // (len(steps) + 1))
    members: list[Member] = []
    path = ""
    for step in steps:
        members.append(_dir(os.path.join(path, component)))
        members.append(_symlink(os.path.join(path, step), component))
        path = os.path.join(path, component)
    deepest = os.path.join(*steps, "l" * 254)
    members.append(_symlink(deepest, os.path.join(*[".."] * len(steps))))
    members.append(_symlink("escape", os.path.join(deepest, "..")))
    return members, "escape"


@functools.cache
def _bomb() -> bytes:
    """90 MiB of zeros in three 30 MiB members (each under the 32 MiB member limit,
    together over the 64 MiB archive limit) that gzip to about 400 KiB."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
        manifest = json.dumps(MANIFEST).encode()
        tar.addfile(_file("manifest.json", manifest)[0], io.BytesIO(manifest))
        size = 30 * 1024 * 1024
        for i in range(3):
            info = tarfile.TarInfo(f"zeros-{i}.bin")
            info.size = size
            tar.addfile(info, _Zeros(size))
    return raw.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


@dataclass(frozen=True)
class Case:
    """A hostile archive (made for the folder it will be extracted next to), the
    member extraction must name and a pattern its reason must match."""

    build: Callable[[Path], bytes]
    member: str
    reason: str


def _symlink_chain(root: Path) -> bytes:
    chain, escape = _chain(root)
    return _tgz(*chain, _file(f"{escape}/newfile", b"written outside\n"))


def _hardlink_chain(root: Path) -> bytes:
    chain, escape = _chain(root)
    return _tgz(
        *chain,
        _hardlink("flaglink", f"{escape}/outside.txt"),
        _file("flaglink", b"overwritten through a hard link\n"),
    )


LONG_PATH = "/".join(["p" * 200] * 6) + "/task.py"  # 1213 bytes: fits PATH_MAX, not the limit
CASES = {
    "symlink-chain-cve-2025-4517": Case(_symlink_chain, "a", "is a symbolic link"),
    "hardlink-chain-overwrite": Case(_hardlink_chain, "a", "is a symbolic link"),
    "hardlink-to-package-file": Case(
        lambda _: _tgz(_hardlink("again.py", "task.py")), "again.py", "is a hard link"
    ),
    "symlink-inside-package": Case(
        lambda _: _tgz(_symlink("alias.py", "task.py")), "alias.py", "is a symbolic link"
    ),
    "symlink-etc-passwd": Case(
        lambda _: _tgz(_symlink("passwd", "/etc/passwd")), "passwd", "is a symbolic link"
    ),
    "file-then-dir": Case(
        lambda _: _tgz(_file("lib"), _dir("lib")), "lib", "earlier member is a file"
    ),
    "dir-then-file": Case(
        lambda _: _tgz(_dir("lib"), _file("lib")), "lib", "earlier member made a folder"
    ),
    "member-under-a-file": Case(
        lambda _: _tgz(_file("lib"), _file("lib/mod.py")), "lib/mod.py", "which is a file"
    ),
    "duplicate-name": Case(
        lambda _: _tgz(_file("lib.py"), _file("lib.py", b"x = 2\n")), "lib.py", "twice"
    ),
    "overlong-component": Case(
        lambda _: _tgz(_file("n" * 300 + ".py")), "n" * 300 + ".py", "303-byte path component"
    ),
    "overlong-path": Case(lambda _: _tgz(_file(LONG_PATH)), LONG_PATH, "1213-byte path"),
    "control-character": Case(
        lambda _: _tgz(_file("evil\nname.py")), "evil\nname.py", "control or invisible"
    ),
    "not-utf8": Case(lambda _: _tgz(_file("caf\udce9.py")), "caf\udce9.py", "not valid UTF-8"),
    "device-node": Case(lambda _: _tgz(_device("null")), "null", "device or special file"),
    "gzip-bomb": Case(lambda _: _bomb(), "zeros-2.bin", "expands past the 67108864 byte limit"),
}


# --- what is on disk ---------------------------------------------------------------


def _snapshot(top: Path, skip: Path | None = None) -> dict[str, str]:
    """Every path below ``top`` (but ``skip``) with what it is: folder, link target
    or content hash."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            rel = path.relative_to(top).as_posix()
            try:
                if path.is_symlink():
                    found[rel] = f"link -> {os.readlink(path)}"
                elif path.is_dir():
                    found[rel] = "folder"
                else:
                    found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:  # a hostile tree can be too deep to name
                found[rel] = f"unreadable: {exc.strerror}"
    return found


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The target's parent folder, holding a file and a sentinel folder beside the
    target that nothing may touch."""
    root = tmp_path / "root"
    (root / "sentinel").mkdir(parents=True)
    (root / "sentinel" / "keep.txt").write_text("keep\n")
    (root / "outside.txt").write_bytes(OUTSIDE)
    return root


def _assert_untouched(tmp_path: Path, site: Path, before: dict[str, str]) -> None:
    assert (site / "outside.txt").read_bytes() == OUTSIDE
    assert _snapshot(tmp_path, skip=site / "pkg") == before  # nothing written outside
    assert not os.path.lexists(site / "pkg")  # nor the target, nor anything left behind


# --- extraction ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_extract_refuses_and_writes_nothing(tmp_path: Path, site: Path, case: Case) -> None:
    data = case.build(site)
    before = _snapshot(tmp_path)
    refused: UnsafeArchiveError | None = None
    try:
        extract_archive(data, site / "pkg")
    except UnsafeArchiveError as exc:
        refused = exc
    _assert_untouched(tmp_path, site, before)  # first: the damage, if any
    assert refused is not None, "extracted"
    assert refused.member == case.member
    assert re.search(case.reason, str(refused)), str(refused)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    return home


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _publish(home: Path, tmp_path: Path, data: bytes) -> None:
    """Publish ``data`` as hostile 1.0.0, signed by a key this machine trusts."""
    code, out, err = _cli("pkg", "keygen", "--out", str(tmp_path / "keys"))
    assert code == 0, out + err
    key = load_private_key(tmp_path / "keys" / "signing.key")
    built = BuiltPackage(read_manifest_from_archive(data), data, digest_of(data))
    repo = PackageRepository(LocalPackageStore(home / "packages"), TrustedKeys([key.public_key()]))
    repo.publish(built, sign_built(key, built))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cli_fetch_refuses_in_one_line(tmp_path: Path, site: Path, home: Path, case: Case) -> None:
    _publish(home, tmp_path, case.build(site))
    before = _snapshot(tmp_path)
    code, out, err = _cli("pkg", "fetch", "hostile@1.0.0", "--to", str(site / "pkg"))
    _assert_untouched(tmp_path, site, before)
    assert code != 0, out + err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("error: ", "refused: ")), err
    assert f"member {repr(case.member)[:30]}" in lines[0], err


def _hard_link_to_outside(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.py").write_text("x = 1\n")
    os.link(tmp_path / "elsewhere.py", folder / "shared.py")


def _control_character_name(folder: Path, tmp_path: Path) -> None:
    (folder / "evil\rname.py").write_text("x = 1\n")


@pytest.mark.parametrize(
    ("plant", "reason"),
    [(_hard_link_to_outside, "is a hard link"), (_control_character_name, "control or invisible")],
    ids=["hard-linked-file", "control-character"],
)
def test_build_refuses_what_extraction_would(
    tmp_path: Path, plant: Callable[[Path, Path], None], reason: str
) -> None:
    """A second name of the file outside would let whoever owns it change the
    package after review; a name extraction refuses would fail on every device."""
    folder = tmp_path / "pkg"
    shutil.copytree(TASKPKGS / "reboot", folder)
    plant(folder, tmp_path)
    with pytest.raises(PackageError, match=reason):
        build_package(folder)


# --- the package cache ---------------------------------------------------------------


@pytest.fixture
def fetched(tmp_path: Path) -> FetchedPackage:
    """firmware-update 1.0.1 (a package with a subpackage), published and fetched."""
    key = Ed25519PrivateKey.generate()
    repo = PackageRepository(LocalPackageStore(tmp_path / "store"), TrustedKeys([key.public_key()]))
    built = build_package(TASKPKGS / "firmware-update")
    repo.publish(built, sign_built(key, built))
    return repo.fetch("firmware-update", "1.0.1")


def _archive_files(data: bytes) -> dict[str, str]:
    """What the archive holds, read with tarfile alone: the reference for the cache."""
    found: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            fh = tar.extractfile(member)
            content = fh.read() if fh else None
            found[member.name] = (
                "folder" if content is None else hashlib.sha256(content).hexdigest()
            )
    return found


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """What a task process running as the cache's owner can do: lift the read-only
    modes, change things, and put the modes back so that they look untouched."""
    targets = [p for p in (path.parent, path) if os.path.lexists(p) and not p.is_symlink()]
    modes = {p: stat.S_IMODE(p.lstat().st_mode) for p in targets}
    for p in targets:
        p.chmod(modes[p] | stat.S_IWUSR)
    try:
        yield
    finally:
        for p in targets:
            if os.path.lexists(p) and not p.is_symlink():
                p.chmod(modes[p])


INJECTED = b"def run(ctx):\n    return 'injected'\n"


def _change_file(tree: Path, tmp_path: Path) -> None:
    with _writable(tree / "firmware_update" / "main.py"):
        (tree / "firmware_update" / "main.py").write_bytes(INJECTED)


def _add_file(tree: Path, tmp_path: Path) -> None:
    with _writable(tree / "firmware_update" / "extra.py"):
        (tree / "firmware_update" / "extra.py").write_bytes(INJECTED)


def _remove_file(tree: Path, tmp_path: Path) -> None:
    with _writable(tree / "firmware_update" / "__init__.py"):
        (tree / "firmware_update" / "__init__.py").unlink()


def _file_to_symlink(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_bytes(INJECTED)
    main = tree / "firmware_update" / "main.py"
    with _writable(main):
        main.unlink()
        main.symlink_to(tmp_path / "evil.py")


def _world_writable(tree: Path, tmp_path: Path) -> None:
    (tree / "firmware_update" / "main.py").chmod(0o666)


def _hard_link_out(tree: Path, tmp_path: Path) -> None:
    # A second name outside lets whoever owns that folder rewrite the file later.
    os.link(tree / "manifest.json", tmp_path / "manifest-alias.json")


def _tree_to_symlink(tree: Path, tmp_path: Path) -> None:
    shutil.copytree(tree, tmp_path / "fake")
    fake = tmp_path / "fake" / "firmware_update" / "main.py"
    fake.chmod(0o644)
    fake.write_bytes(INJECTED)
    with _writable(tree):
        _remove(tree)
        tree.symlink_to(tmp_path / "fake")


def _remove(tree: Path) -> None:
    for dirpath, _, _ in os.walk(tree):
        Path(dirpath).chmod(0o755)
    shutil.rmtree(tree)


TAMPERS = {
    "changed-file": _change_file,
    "added-file": _add_file,
    "removed-file": _remove_file,
    "file-replaced-by-symlink": _file_to_symlink,
    "world-writable-file": _world_writable,
    "hard-linked-file": _hard_link_out,
    "folder-replaced-by-symlink": _tree_to_symlink,
}


READ_ONLY = {
    ".": 0o555,
    "manifest.json": 0o444,
    "firmware_update": 0o555,
    "firmware_update/__init__.py": 0o444,
    "firmware_update/main.py": 0o444,
}


def _modes(tree: Path) -> dict[str, int]:
    return {
        p.relative_to(tree).as_posix(): stat.S_IMODE(p.lstat().st_mode)
        for p in [tree, *tree.rglob("*")]
    }


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_tampered_cache_is_extracted_afresh(
    tmp_path: Path,
    fetched: FetchedPackage,
    tamper: Callable[[Path, Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    first = fetched.materialise(cache)
    tamper(first, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mayfly.packages"):
        again = fetched.materialise(cache)
    assert again == first
    assert not again.is_symlink()
    assert _snapshot(again) == _archive_files(fetched.data)  # the tamper is gone
    assert INJECTED not in b"".join(p.read_bytes() for p in again.rglob("*.py"))
    assert all(p.stat().st_nlink == 1 for p in again.rglob("*") if p.is_file())
    assert _modes(again) == READ_ONLY
    assert "differs from its signed archive" in caplog.text
    assert sorted(p.name for p in cache.iterdir()) == [again.name]  # nothing discarded left


def test_cache_is_read_only_and_reused_untouched(
    tmp_path: Path, fetched: FetchedPackage, caplog: pytest.LogCaptureFixture
) -> None:
    first = fetched.materialise(tmp_path / "cache")
    assert _modes(first) == READ_ONLY
    inode = (first / "firmware_update" / "main.py").stat().st_ino
    with caplog.at_level(logging.WARNING, logger="mayfly.packages"):
        again = fetched.materialise(tmp_path / "cache")
    assert (again / "firmware_update" / "main.py").stat().st_ino == inode  # not re-extracted
    assert caplog.text == ""


def test_planted_bytecode_never_runs(tmp_path: Path, fetched: FetchedPackage) -> None:
    """Python prefers a ``__pycache__`` file whose header matches the source's size
    and mtime over the source: a planted one would run instead of verified code."""
    tree = fetched.materialise(tmp_path / "cache")
    pycache = tree / "firmware_update" / "__pycache__"
    with _writable(pycache):
        pycache.mkdir()
        (pycache / f"main.{sys.implementation.cache_tag}.pyc").write_bytes(b"planted")
    again = fetched.materialise(tmp_path / "cache")
    assert not os.path.lexists(again / "firmware_update" / "__pycache__")
    assert _snapshot(again) == _archive_files(fetched.data)


# --- a cache checked in full once, then by its metadata -------------------------------


class _FullChecks:
    """Counts the full checks (every file hashed) that materialise runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = repository.tree_mismatch

        def counted(root: Path, expected: dict[str, ArchiveEntry]) -> str | None:
            self.count += 1
            return real(root, expected)

        monkeypatch.setattr(repository, "tree_mismatch", counted)


@pytest.fixture
def full_checks(monkeypatch: pytest.MonkeyPatch) -> _FullChecks:
    return _FullChecks(monkeypatch)


def _checked_once(fetched: FetchedPackage, cache: Path, full_checks: _FullChecks) -> Path:
    """Materialise until the tree is old enough to be remembered, then prove it is:
    a use that hashes nothing."""
    tree = fetched.materialise(cache)
    for _ in range(40):
        time.sleep(0.06)
        before = full_checks.count
        fetched.materialise(cache)
        if full_checks.count == before:
            break
    before = full_checks.count
    assert fetched.materialise(cache) == tree
    assert full_checks.count == before, "a tree checked in full should be reused by its metadata"
    return tree


def _rewrite_in_place_keeping_mtime(tree: Path, tmp_path: Path) -> None:
    """Same inode, size, mode and mtime: only the ctime can tell."""
    main = tree / "firmware_update" / "main.py"
    before = main.stat()
    injected = INJECTED.ljust(before.st_size, b" ")[: before.st_size]
    main.chmod(0o644)
    with main.open("r+b") as fh:
        fh.write(injected)
    main.chmod(stat.S_IMODE(before.st_mode))
    os.utime(main, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = main.stat()
    assert (after.st_ino, after.st_size, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mode,
        before.st_mtime_ns,
    )


SNAPSHOT_TAMPERS = {**TAMPERS, "rewritten-in-place-mtime-restored": _rewrite_in_place_keeping_mtime}


@pytest.mark.parametrize("tamper", SNAPSHOT_TAMPERS.values(), ids=SNAPSHOT_TAMPERS.keys())
def test_a_tamper_after_the_full_check_is_caught_by_the_metadata(
    tmp_path: Path,
    fetched: FetchedPackage,
    full_checks: _FullChecks,
    tamper: Callable[[Path, Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    tree = _checked_once(fetched, cache, full_checks)
    tamper(tree, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mayfly.packages"):
        again = fetched.materialise(cache)
    assert "differs from its signed archive" in caplog.text
    assert _snapshot(again) == _archive_files(fetched.data)
    assert INJECTED not in b"".join(p.read_bytes() for p in again.rglob("*.py"))
    assert _modes(again) == READ_ONLY


def test_a_chmod_put_back_is_checked_in_full_and_kept(
    tmp_path: Path, fetched: FetchedPackage, full_checks: _FullChecks
) -> None:
    cache = tmp_path / "cache"
    tree = _checked_once(fetched, cache, full_checks)
    main = tree / "firmware_update" / "main.py"
    inode = main.stat().st_ino
    main.chmod(0o666)
    main.chmod(0o444)
    before = full_checks.count
    fetched.materialise(cache)
    assert full_checks.count == before + 1  # the metadata differed: every file hashed
    assert main.stat().st_ino == inode  # and found right, so kept


def test_planted_bytecode_after_the_full_check_never_runs(
    tmp_path: Path, fetched: FetchedPackage, full_checks: _FullChecks
) -> None:
    tree = _checked_once(fetched, tmp_path / "cache", full_checks)
    pycache = tree / "firmware_update" / "__pycache__"
    with _writable(pycache):
        pycache.mkdir()
        (pycache / f"main.{sys.implementation.cache_tag}.pyc").write_bytes(b"planted")
    again = fetched.materialise(tmp_path / "cache")
    assert not os.path.lexists(again / "firmware_update" / "__pycache__")


def test_cli_fetch_into_the_cache_undoes_a_tamper(home: Path, tmp_path: Path) -> None:
    assert _cli("pkg", "keygen")[0] == 0
    assert _cli("pkg", "publish", str(TASKPKGS / "reboot"))[0] == 0
    code, out, err = _cli("pkg", "fetch", "reboot")
    assert code == 0, out + err
    tree = Path(out.split(" -> ")[1].strip())
    with _writable(tree / "reboot.py"):
        (tree / "reboot.py").write_bytes(INJECTED)
    assert _cli("pkg", "verify", "reboot")[0] == 0  # the store is fine; the cache was not
    code, out, err = _cli("pkg", "fetch", "reboot")
    assert code == 0, out + err
    assert (tree / "reboot.py").read_bytes() == (TASKPKGS / "reboot" / "reboot.py").read_bytes()


NOBODY = 65534


def _tamper_as_nobody(fetched: FetchedPackage, cache: Path) -> None:
    tree = fetched.materialise(cache)
    main = tree / "firmware_update" / "main.py"
    with pytest.raises(PermissionError):
        main.write_bytes(INJECTED)
    with pytest.raises(PermissionError):
        (tree / "extra.py").write_bytes(INJECTED)
    with _writable(main):
        main.write_bytes(INJECTED)
    again = fetched.materialise(cache)
    assert _snapshot(again) == _archive_files(fetched.data)
    assert sorted(p.name for p in cache.iterdir()) == [again.name]


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user, the other tests already are")
def test_read_only_cache_holds_and_is_replaced_without_root(fetched: FetchedPackage) -> None:
    """Root ignores modes: as ``nobody`` (a forked child that drops to it), a
    read-only file cannot be written nor a file added, and a tampered tree is
    still discarded, which needs its folders made writable before the delete."""
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        cache = Path(top, "cache")
        cache.mkdir()
        os.chown(cache, NOBODY, NOBODY)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            status = 1
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                _tamper_as_nobody(fetched, cache)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "see the child's traceback above"
        _remove(cache)
