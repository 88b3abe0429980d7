"""The package store port and its embedded implementation, a local folder.

A store is a flat key/value space shaped like a bucket: keys such as
``reboot/1.0.0/package.tar.gz``. The repository puts meaning on top; a store
only has to keep bytes and honour "create only if absent", which is what
makes published versions immutable even with two publishers racing.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from mayfly.errors import StoreError

#: The files of one published version, ``<name>/<version>/<file>``; the
#: signature is written last, so a version is published once it is there.
ARCHIVE, MANIFEST, SIGNATURE = "package.tar.gz", "manifest.json", "package.sig"

__all__ = ["LocalPackageStore", "PackageStore", "check_key"]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def check_key(key: str) -> str:
    """Refuse keys that could address anything outside the store."""
    if not _KEY.match(key) or ".." in key.split("/"):
        raise StoreError(f"invalid store key {key!r}")
    return key


@runtime_checkable
class PackageStore(Protocol):
    """Where package bytes live: a local folder or an S3 bucket."""

    def describe(self) -> str:
        """Where this store is, for messages (a path or ``s3://bucket``)."""
        ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such key."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Create or replace an object (channels move; versions never do)."""
        ...

    def put_new(self, key: str, data: bytes) -> bool:
        """Create an object only if the key is free; False when it already exists."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix``, sorted."""
        ...


class LocalPackageStore:
    """A folder on disk laid out like the bucket: the embedded default."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.root}: {exc.strerror}") from exc

    def _staged(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            tmp = self._staged(path, data)
            os.replace(tmp, path)  # readers see the old or the new bytes, never half
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.root}: {exc.strerror}") from exc

    def put_new(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._staged(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.root}: {exc.strerror}") from exc
        try:
            # link() fails if the name exists: an atomic create-if-absent with
            # the full content already in place.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot write {key} to {self.root}: {exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def list_keys(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                key = (rel / name).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)
