"""Deterministic package archives and their safe extraction.

Build: the same folder gives the same bytes (and so the same sha256) whatever
the files' mtimes, owners, permissions beyond the exec bit, or the order the
file system lists them in. That is what makes a digest mean "this code".

Extract: an archive is untrusted input until its signature verifies, and even
then it is unpacked as data, not replayed as a tar: a package holds regular
files and folders only. Links of any kind, devices and FIFOs are refused, and
so are absolute paths, ``..``, names that are not printable UTF-8 or longer
than the bounds, a second member at one path and a member under a file. Sizes
and the member count are bounded, counted on the decompressed stream so a gzip
bomb is stopped while it inflates. tarfile's own extraction (and its filters,
which CVE-2025-4517 got past on 3.11.7) is never used: every folder is made
here and every file is opened ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to a
folder descriptor inside a fresh staging folder, which is renamed into place
whole. Nothing outside ``dest`` can be written, whatever the archive holds.

Verify: :func:`archive_tree` says what an extraction holds (paths, kinds,
modes, sha256) from the archive bytes alone, and :func:`tree_mismatch` checks
a read-only extracted tree against it, so a cached copy is re-verified before
its code runs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mayfly.errors import PackageError, UnsafeArchiveError
from mayfly.packages.checks import compile_modules, schema_examples
from mayfly.packages.deps import DEPS_DIR, resolve_dependencies
from mayfly.packages.manifest import MANIFEST_FILE, Manifest, load_manifest, parse_manifest

__all__ = [
    "ArchiveEntry",
    "ArchiveLimits",
    "BuiltPackage",
    "archive_tree",
    "build_package",
    "digest_of",
    "extract_archive",
    "read_manifest_from_archive",
    "remove_tree",
    "tree_mismatch",
]

# Files an author's tools leave behind that never belong in a package.
_IGNORED_NAMES = frozenset({"__pycache__", ".git", ".DS_Store", ".pytest_cache", ".mypy_cache"})
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Where Python writes bytecode beside imported code, when it may.
_BYTECODE_DIR = "__pycache__"


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what extraction will write."""

    max_bytes: int = 64 * 1024 * 1024
    """Total decompressed bytes (tar headers included)."""
    max_files: int = 2_000
    max_member_bytes: int = 32 * 1024 * 1024
    max_name_bytes: int = 255
    """Longest component of a member's path, in UTF-8 bytes (Linux's NAME_MAX)."""
    max_path_bytes: int = 1024
    """Longest member path, in UTF-8 bytes."""


@dataclass(frozen=True)
class BuiltPackage:
    """A built archive: its bytes, digest and the manifest inside it."""

    manifest: Manifest
    data: bytes
    digest: str
    found: tuple[str, ...] = ()
    """What its build checked and carried, a line each (empty for an archive read)."""

    @property
    def filename(self) -> str:
        return f"{self.manifest.name}-{self.manifest.version}.tar.gz"


@dataclass(frozen=True)
class ArchiveEntry:
    """One path an extraction creates: a folder, or a file with its content's hash."""

    is_dir: bool
    executable: bool = False
    size: int = 0
    sha256: bytes = b""


def digest_of(data: bytes) -> str:
    """The ``sha256:<hex>`` digest Mayfly uses to name archive bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- names ---------------------------------------------------------------------------


def _shown(name: str) -> str:
    """A member name for a one-line message: escaped, and cut short when long."""
    return repr(name if len(name) <= 80 else f"{name[:60]}...{name[-12:]}")


def _refuse(name: str, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"member {_shown(name)} {reason}", member=name)


def _split_name(name: str, limits: ArchiveLimits) -> tuple[str, ...]:
    """The path components of a member name, or why the name is refused."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise _refuse(name, "has a name that is not valid UTF-8") from None
    # Control, format, unassigned and separator characters (all but the plain
    # space) have no place in a module path and make names that print as others.
    if not name.isprintable():
        raise _refuse(name, "has a control or invisible character in its name")
    if name.startswith("/") or "\\" in name:
        raise _refuse(name, "has an absolute path" if name[:1] in "/\\" else "has a backslash")
    if size > limits.max_path_bytes:
        raise _refuse(name, f"has a {size}-byte path, over the {limits.max_path_bytes} limit")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if parts and ":" in parts[0]:
        raise _refuse(name, "has an absolute path")
    if ".." in parts:
        raise _refuse(name, "climbs out with '..'")
    for part in parts:
        if len(part.encode()) > limits.max_name_bytes:
            raise _refuse(
                name,
                f"has a {len(part.encode())}-byte path component, "
                f"over the {limits.max_name_bytes} limit",
            )
    return parts


def _check_member(member: tarfile.TarInfo, limits: ArchiveLimits) -> tuple[tuple[str, ...], bool]:
    """Refuse a member that is not a plain file or folder with a sane name.

    Returns:
        The member's path components and whether it is a folder.
    """
    name = member.name
    parts = _split_name(name, limits)
    if member.type == tarfile.SYMTYPE:
        raise _refuse(
            name, f"is a symbolic link (to {_shown(member.linkname)}); packages hold no links"
        )
    if member.type == tarfile.LNKTYPE:
        raise _refuse(
            name, f"is a hard link (to {_shown(member.linkname)}); packages hold no links"
        )
    is_dir = member.type == tarfile.DIRTYPE
    if not (is_dir or member.type in _FILE_TYPES):
        kind = {
            tarfile.CHRTYPE: "character device",
            tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "FIFO",
        }.get(member.type, f"tar type {member.type!r}")
        raise _refuse(name, f"is a device or special file ({kind}); packages hold only files")
    if not is_dir and member.size > limits.max_member_bytes:
        raise _refuse(name, f"is {member.size} bytes, over the {limits.max_member_bytes} limit")
    if not is_dir and not parts:
        raise _refuse(name, "is a file without a name")
    return parts, is_dir


class _Layout:
    """What the members seen so far put where: one member per path, nothing under a file."""

    def __init__(self) -> None:
        self._dirs: set[tuple[str, ...]] = {()}
        self._named_dirs: set[tuple[str, ...]] = set()
        self._files: set[tuple[str, ...]] = set()

    def place(self, name: str, parts: tuple[str, ...], is_dir: bool) -> list[tuple[str, ...]]:
        """Record one member; return the folders to create for it, outermost first."""
        new: list[tuple[str, ...]] = []
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            if prefix in self._files:
                raise _refuse(name, f"sits under {'/'.join(prefix)!r}, which is a file")
            if prefix not in self._dirs:
                self._dirs.add(prefix)
                new.append(prefix)
        if parts in self._files:
            raise _refuse(
                name,
                "is a folder, but an earlier member is a file there"
                if is_dir
                else "appears twice in the archive",
            )
        if not is_dir and parts in self._dirs:
            raise _refuse(name, "is a file, but an earlier member made a folder there")
        if is_dir and parts in self._named_dirs:
            raise _refuse(name, "appears twice in the archive")
        if is_dir:
            self._named_dirs.add(parts)
            if parts not in self._dirs:
                self._dirs.add(parts)
                new.append(parts)
        else:
            self._files.add(parts)
        return new


# --- build ---------------------------------------------------------------------------


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_NAMES)
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():
                raise PackageError(f"{base / name} is a symbolic link; packages hold only files")
            found.append(base / name)
        for name in sorted(filenames):
            if name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES):
                continue
            path = base / name
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise PackageError(f"{path} is not a regular file; packages hold only files")
            # tarfile would store a second name of one inode as a hard-link member,
            # which extraction refuses: say so now, not on every device.
            if st.st_nlink > 1:
                raise PackageError(
                    f"{path} is a hard link ({st.st_nlink} names for one file); packages hold "
                    "only plain files: copy it to a file of its own"
                )
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _normalised(info: tarfile.TarInfo, executable: bool) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isdir():
        info.mode = 0o755
    else:
        info.mode = 0o755 if executable else 0o644
    return info


def build_package(folder: Path, *, wheel_cache: Path | None = None) -> BuiltPackage:
    """Build the deterministic ``tar.gz`` of a package folder, its dependencies
    resolved and unpacked into it (:mod:`mayfly.packages.deps`; their wheels
    cached in ``wheel_cache``).

    Raises:
        ManifestError: if the manifest is missing or invalid.
        PackageError: if the folder holds links, hard-linked or special files,
            names that extraction would refuse, lacks the entrypoint module,
            its dependencies cannot be resolved, or the whole is over the
            bounds extraction keeps to.
    """
    folder = folder.resolve()
    manifest = load_manifest(folder)
    where = {"package": manifest.name, "version": manifest.version}
    module_path = manifest.module.replace(".", "/")
    if not ((folder / f"{module_path}.py").is_file() or (folder / module_path).is_dir()):
        raise PackageError(f"entrypoint module {manifest.module!r} not found in {folder}", **where)
    if (folder / DEPS_DIR).exists():
        raise PackageError(
            f"{folder / DEPS_DIR}: that name is where a build puts the package's dependencies; "
            "list them in the manifest's dependencies instead",
            **where,
        )
    own = _walk(folder)
    modules = compile_modules(folder, own, manifest)
    defaults, examples = schema_examples(manifest)
    found = [
        f"{modules} module(s) compile",
        f"params schema: {defaults} default(s) and {examples} example(s) match it",
    ]
    if not manifest.dependencies:
        return _archive(folder, [(folder, p) for p in own], manifest, found)
    with tempfile.TemporaryDirectory(prefix="mayfly-build-") as staging:
        deps = Path(staging) / DEPS_DIR
        try:
            resolve_dependencies(manifest.dependencies, deps, wheel_cache)
        except PackageError as exc:
            raise PackageError(exc.reason, **where) from exc
        carried = sorted(p.name.removesuffix(".dist-info") for p in deps.glob("*.dist-info"))
        found.append(f"dependencies in {DEPS_DIR}/: {', '.join(carried) or 'none'}")
        entries = [(folder, p) for p in own]
        entries += [(Path(staging), deps), *((Path(staging), p) for p in _walk(deps))]
        return _archive(folder, entries, manifest, found)


def _archive(
    folder: Path, entries: list[tuple[Path, Path]], manifest: Manifest, found: list[str]
) -> BuiltPackage:
    """The archive of ``entries`` (each a root and a path below it, archived
    by its path from the root), refused when extraction would refuse it."""
    where = {"package": manifest.name, "version": manifest.version}
    limits = ArchiveLimits()
    files = sum(1 for _, p in entries if not p.is_dir())
    size = sum(p.stat().st_size for _, p in entries if not p.is_dir())
    if files > limits.max_files or size > limits.max_bytes:
        raise PackageError(
            f"{folder}: {files} files, {size / 1e6:.1f} MB with its dependencies; a package "
            f"holds at most {limits.max_files} files and {limits.max_bytes / 1e6:.0f} MB",
            **where,
        )
    raw = io.BytesIO()
    # gzip header mtime=0 and no file name: otherwise the bytes change per build.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for root, path in entries:
            arcname = path.relative_to(root).as_posix()
            try:
                _split_name(arcname, limits)
            except UnsafeArchiveError as exc:
                raise PackageError(f"{exc.reason} (in {folder})", **where) from exc
            info = _normalised(tar.gettarinfo(str(path), arcname), os.access(path, os.X_OK))
            info.pax_headers = {}
            if info.isfile():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    data = raw.getvalue()
    return BuiltPackage(manifest=manifest, data=data, digest=digest_of(data), found=tuple(found))


# --- reading -------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Decompressed stream that stops once more than ``limit`` bytes were read."""

    def __init__(self, inner: gzip.GzipFile, limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        chunk = self._inner.read(len(buffer))
        self.count += len(chunk)
        if self.count > self._limit:
            raise UnsafeArchiveError(
                f"archive expands past the {self._limit} byte limit (decompression bomb?)"
            )
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _open_tar(data: bytes, limits: ArchiveLimits) -> tarfile.TarFile:
    try:
        gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
    except OSError as exc:
        raise UnsafeArchiveError(f"not a gzip archive: {exc}") from exc
    reader = io.BufferedReader(_CountingReader(gz, limits.max_bytes))
    try:
        # Names that are not UTF-8 come through as lone surrogates, which
        # _split_name refuses, instead of as mojibake.
        return tarfile.open(fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsafeArchiveError(f"not a tar archive: {exc}") from exc


_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)
_Member = tuple[tarfile.TarInfo, tuple[str, ...], list[tuple[str, ...]], IO[bytes] | None]


def _members(data: bytes, limits: ArchiveLimits) -> Iterator[_Member]:
    """Each checked member with its path, the folders to create first and, for a
    file, its content (readable until the next member).

    Raises:
        UnsafeArchiveError: naming the first member refused and why, or saying
            the archive is corrupt or too large.
    """
    layout = _Layout()
    try:
        with _open_tar(data, limits) as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_files:
                    raise UnsafeArchiveError(f"archive holds more than {limits.max_files} members")
                parts, is_dir = _check_member(member, limits)
                new_dirs = layout.place(member.name, parts, is_dir)
                yield member, parts, new_dirs, None if is_dir else tar.extractfile(member)
    except _CORRUPT as exc:
        raise UnsafeArchiveError(f"corrupt archive: {exc}") from exc


@contextlib.contextmanager
def _reading(member: tarfile.TarInfo) -> Iterator[None]:
    """Turn a failure of the stream while ``member``'s content is read (a bomb
    going past the limit, a truncated or corrupt archive) into an error naming it."""
    try:
        yield
    except UnsafeArchiveError as exc:
        if exc.member is not None:
            raise
        name = member.name
        raise UnsafeArchiveError(f"member {_shown(name)}: {exc.reason}", member=name) from exc
    except _CORRUPT as exc:
        raise _refuse(member.name, f"is corrupt or cut short ({exc})") from exc


def read_manifest_from_archive(data: bytes, limits: ArchiveLimits | None = None) -> Manifest:
    """Read and validate the manifest inside archive bytes without extracting."""
    limits = limits or ArchiveLimits()
    with _open_tar(data, limits) as tar:
        for member in tar:
            if member.name == MANIFEST_FILE and member.isfile():
                fh = tar.extractfile(member)
                if fh is None:
                    break
                return parse_manifest(fh.read(), origin=f"archive {MANIFEST_FILE}")
    raise UnsafeArchiveError(f"archive has no {MANIFEST_FILE}")


def archive_tree(data: bytes, limits: ArchiveLimits | None = None) -> dict[str, ArchiveEntry]:
    """What extracting ``data`` creates, by ``/``-separated path (the top folder left
    out), from the bytes alone: every member is checked as extraction checks it.

    Raises:
        UnsafeArchiveError: as :func:`extract_archive` would.
    """
    tree: dict[str, ArchiveEntry] = {}
    for member, parts, new_dirs, content in _members(data, limits or ArchiveLimits()):
        for folder in new_dirs:
            tree["/".join(folder)] = ArchiveEntry(is_dir=True)
        if content is not None:
            digest = hashlib.sha256()
            with _reading(member):
                while chunk := content.read(_CHUNK):
                    digest.update(chunk)
            tree["/".join(parts)] = ArchiveEntry(
                is_dir=False,
                executable=_executable(member),
                size=member.size,
                sha256=digest.digest(),
            )
    return tree


# --- extraction ----------------------------------------------------------------------


def _executable(member: tarfile.TarInfo) -> bool:
    return bool(member.mode & 0o111)


def _modes(read_only: bool) -> tuple[int, int, int]:
    """Folder, file and executable-file modes."""
    return (0o555, 0o444, 0o555) if read_only else (0o755, 0o644, 0o755)


def _open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    """A descriptor of the folder ``parts`` below ``root_fd``, following no link."""
    fd = os.dup(root_fd)
    for part in parts:
        try:
            inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


def _make_dir(root_fd: int, parts: tuple[str, ...]) -> None:
    parent = _open_dir(root_fd, parts[:-1])
    try:
        os.mkdir(parts[-1], 0o700, dir_fd=parent)
    finally:
        os.close(parent)


def _write_file(root_fd: int, parts: tuple[str, ...], content: IO[bytes], mode: int) -> None:
    parent = _open_dir(root_fd, parts[:-1])
    try:
        fd = os.open(parts[-1], _NEW_FILE_FLAGS, 0o600, dir_fd=parent)
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(content, out, _CHUNK)
        os.fchmod(out.fileno(), mode)


def _extract_into(data: bytes, root_fd: int, limits: ArchiveLimits, read_only: bool) -> None:
    dir_mode, file_mode, exec_mode = _modes(read_only)
    made: list[tuple[str, ...]] = [()]
    for member, parts, new_dirs, content in _members(data, limits):
        with _reading(member):
            try:
                for folder in new_dirs:
                    _make_dir(root_fd, folder)
                    made.append(folder)
                if content is not None:
                    mode = exec_mode if _executable(member) else file_mode
                    _write_file(root_fd, parts, content, mode)
            except _CORRUPT:
                raise  # a broken stream, not a full disk: _reading names it
            except OSError as exc:
                raise PackageError(
                    f"cannot extract member {_shown(member.name)}: {exc.strerror or exc}"
                ) from exc
    # Folders stay writable (to us) until every file is in; modes are set last.
    for folder in made:
        fd = _open_dir(root_fd, folder)
        try:
            os.fchmod(fd, dir_mode)
        finally:
            os.close(fd)


def extract_archive(
    data: bytes, dest: Path, limits: ArchiveLimits | None = None, *, read_only: bool = False
) -> Path:
    """Extract archive bytes into ``dest`` (which must not exist yet).

    Extraction goes to a sibling temporary folder that is renamed into place
    only once every member passed, so a refused archive leaves nothing behind
    and a concurrent reader never sees half a package. Files get mode 0o644
    (0o755 if executable) and folders 0o755, or 0o444/0o555 and 0o555 when
    ``read_only``; owners and times are not restored.

    Raises:
        UnsafeArchiveError: naming the offending member and why.
        PackageError: if the folder cannot be written.
    """
    limits = limits or ArchiveLimits()
    dest = dest.absolute()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    except OSError as exc:
        raise PackageError(f"cannot extract into {dest.parent}: {exc.strerror or exc}") from exc
    try:
        root_fd = os.open(staging, _DIR_FLAGS)
        try:
            _extract_into(data, root_fd, limits, read_only)
        finally:
            os.close(root_fd)
        try:
            staging.rename(dest)
        except OSError as exc:
            if dest.is_dir() and not dest.is_symlink():
                return dest  # another process extracted the same digest first
            raise PackageError(f"cannot move package into {dest}: {exc.strerror}") from exc
    finally:
        remove_tree(staging)
    return dest


def remove_tree(path: Path) -> None:
    """Delete ``path`` as far as possible, even a tree extraction made read-only.

    A link or file is unlinked (never followed); a folder is made writable
    folder by folder (through descriptors opened without following links),
    then removed.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return
    except OSError:
        return
    for dirpath, _dirnames, _filenames in os.walk(path):  # never descends into links
        try:
            fd = os.open(dirpath, _DIR_FLAGS)
        except OSError:
            continue
        try:
            os.fchmod(fd, 0o700)
        except OSError:
            pass
        finally:
            os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


# --- verification of an extracted tree -----------------------------------------------


def tree_mismatch(root: Path, expected: dict[str, ArchiveEntry]) -> str | None:
    """Why the read-only tree at ``root`` differs from ``expected``, or None if it does not.

    Same paths, kinds, content (sha256, each file read once), modes (0o444 or
    0o555 for files, 0o555 for folders), owner (this process's user) and a
    single link per file; a symbolic link anywhere is a difference. A
    ``__pycache__`` folder the archive does not hold is the interpreter's
    byproduct, not package content: it is deleted, never trusted, so imports
    compile from the verified sources.
    """
    uid = os.geteuid()
    dir_mode, file_mode, exec_mode = _modes(read_only=True)
    try:
        problem = _dir_problem(".", os.lstat(root), uid, dir_mode)
        if problem:
            return problem
        seen: set[str] = set()
        byproducts: list[str] = []
        pending = [("", str(root))]
        while pending:
            rel, folder = pending.pop()
            with os.scandir(folder) as listing:
                entries = list(listing)
            for entry in entries:
                key = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                want = expected.get(key)
                if want is None:
                    if entry.name == _BYTECODE_DIR and stat.S_ISDIR(st.st_mode):
                        byproducts.append(entry.path)
                        continue
                    return f"{key!r} is not in the archive"
                seen.add(key)
                if stat.S_ISLNK(st.st_mode):
                    return f"{key!r} is a symbolic link"
                if want.is_dir:
                    problem = _dir_problem(key, st, uid, dir_mode)
                    pending.append((key, entry.path))
                else:
                    problem = _file_problem(
                        key, entry.path, st, want, uid, exec_mode if want.executable else file_mode
                    )
                if problem:
                    return problem
        missing = expected.keys() - seen
        if missing:
            return f"{min(missing)!r} is missing"
    except OSError as exc:
        return f"unreadable: {exc}"
    for path in byproducts:
        remove_tree(Path(path))
        if os.path.lexists(path):
            return f"cannot remove the bytecode folder {path}"
    return None


def _dir_problem(key: str, st: os.stat_result, uid: int, mode: int) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return f"{key!r} is not a folder"
    return _owner_problem(key, st, uid, mode)


def _owner_problem(key: str, st: os.stat_result, uid: int, mode: int) -> str | None:
    if st.st_uid != uid:
        return f"{key!r} belongs to uid {st.st_uid}, not {uid}"
    if stat.S_IMODE(st.st_mode) != mode:
        return f"{key!r} has mode {stat.S_IMODE(st.st_mode):#o}, not {mode:#o}"
    return None


def _file_problem(
    key: str, path: str, st: os.stat_result, want: ArchiveEntry, uid: int, mode: int
) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{key!r} is not a regular file"
    # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the check.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)  # what is hashed is what is checked
        if not stat.S_ISREG(st.st_mode):
            return f"{key!r} is not a regular file"
        problem = _owner_problem(key, st, uid, mode)
        if problem:
            return problem
        if st.st_nlink != 1:
            return f"{key!r} has {st.st_nlink} hard links"
        if st.st_size != want.size or hashlib.file_digest(fh, "sha256").digest() != want.sha256:
            return f"{key!r} differs from the archive"
    return None
