"""Deterministic package archives and their safe extraction.

Build: the same folder gives the same bytes (and so the same sha256) whatever
the files' mtimes, owners, permissions beyond the exec bit, or the order the
file system lists them in. That is what makes a digest mean "this code".

Extract: an archive is untrusted input until its signature verifies, and even
then it is unpacked defensively: no absolute paths, no ``..``, no links that
leave the folder, no devices, and bounded size and file count, counted on the
decompressed stream so a gzip bomb is stopped while it inflates.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from mayfly.errors import PackageError, UnsafeArchiveError
from mayfly.packages.manifest import MANIFEST_FILE, Manifest, load_manifest, parse_manifest

__all__ = [
    "ArchiveLimits",
    "BuiltPackage",
    "build_package",
    "digest_of",
    "extract_archive",
    "read_manifest_from_archive",
]

# Files an author's tools leave behind that never belong in a package.
_IGNORED_NAMES = frozenset({"__pycache__", ".git", ".DS_Store", ".pytest_cache", ".mypy_cache"})
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what extraction will write."""

    max_bytes: int = 64 * 1024 * 1024
    """Total decompressed bytes (tar headers included)."""
    max_files: int = 2_000
    max_member_bytes: int = 32 * 1024 * 1024


@dataclass(frozen=True)
class BuiltPackage:
    """A built archive: its bytes, digest and the manifest inside it."""

    manifest: Manifest
    data: bytes
    digest: str

    @property
    def filename(self) -> str:
        return f"{self.manifest.name}-{self.manifest.version}.tar.gz"


def digest_of(data: bytes) -> str:
    """The ``sha256:<hex>`` digest Mayfly uses to name archive bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                raise PackageError(f"{path} is not a regular file; packages hold only files")
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


def build_package(folder: Path) -> BuiltPackage:
    """Build the deterministic ``tar.gz`` of a package folder.

    Raises:
        ManifestError: if the manifest is missing or invalid.
        PackageError: if the folder holds links or special files, or lacks the
            entrypoint module.
    """
    folder = folder.resolve()
    manifest = load_manifest(folder)
    module_path = manifest.module.replace(".", "/")
    if not ((folder / f"{module_path}.py").is_file() or (folder / module_path).is_dir()):
        raise PackageError(
            f"entrypoint module {manifest.module!r} not found in {folder}",
            package=manifest.name,
            version=manifest.version,
        )
    raw = io.BytesIO()
    # gzip header mtime=0 and no file name: otherwise the bytes change per build.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in _walk(folder):
            arcname = path.relative_to(folder).as_posix()
            info = _normalised(tar.gettarinfo(str(path), arcname), os.access(path, os.X_OK))
            info.pax_headers = {}
            if info.isfile():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    data = raw.getvalue()
    return BuiltPackage(manifest=manifest, data=data, digest=digest_of(data))


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
        return tarfile.open(fileobj=reader, mode="r|")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnsafeArchiveError(f"not a tar archive: {exc}") from exc


def _check_member(member: tarfile.TarInfo, dest: Path, limits: ArchiveLimits) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or Path(name).is_absolute() or (parts and ":" in parts[0]):
        raise UnsafeArchiveError(f"member {name!r} has an absolute path")
    if ".." in parts:
        raise UnsafeArchiveError(f"member {name!r} climbs out with '..'")
    if (
        member.isdev()
        or member.isfifo()
        or not (member.isfile() or member.isdir() or member.issym() or member.islnk())
    ):
        raise UnsafeArchiveError(f"member {name!r} is a device or special file")
    if member.size > limits.max_member_bytes:
        raise UnsafeArchiveError(
            f"member {name!r} is {member.size} bytes, over the {limits.max_member_bytes} limit"
        )
    if member.issym() or member.islnk():
        target = member.linkname
        base = (dest / name).parent if member.issym() else dest
        resolved = Path(os.path.normpath(base / target)) if not Path(target).is_absolute() else None
        if resolved is None or not resolved.is_relative_to(dest):
            raise UnsafeArchiveError(f"member {name!r} links outside the package to {target!r}")


def extract_archive(data: bytes, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Extract archive bytes into ``dest`` (which must not exist yet).

    Extraction goes to a sibling temporary folder that is renamed into place
    only once every member passed, so a refused archive leaves nothing behind
    and a concurrent reader never sees half a package.

    Raises:
        UnsafeArchiveError: naming the offending member and why.
    """
    limits = limits or ArchiveLimits()
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        _extract_into(data, staging.resolve(), limits)
        try:
            staging.rename(dest)
        except OSError as exc:
            if dest.is_dir():  # another process extracted the same digest first
                return dest
            raise PackageError(f"cannot move package into {dest}: {exc.strerror}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract_into(data: bytes, root: Path, limits: ArchiveLimits) -> None:
    files = 0
    try:
        with _open_tar(data, limits) as tar:
            for member in tar:
                files += 1
                if files > limits.max_files:
                    raise UnsafeArchiveError(f"archive holds more than {limits.max_files} members")
                _check_member(member, root, limits)
                # The stdlib "data" filter repeats these checks and also strips
                # set-uid bits and foreign ownership: two locks on one door.
                tar.extract(member, root, filter="data")
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"refused member: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise UnsafeArchiveError(f"corrupt archive: {exc}") from exc


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
