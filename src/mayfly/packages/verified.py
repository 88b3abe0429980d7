"""Package versions this process already verified, kept for the next request.

A published version is immutable: its name and version stand for one archive,
signed once (``put_new`` never replaces it). So the bytes that verified the
first time are the bytes to run every later time. Reading them again from the
store would only give someone with write access to the store a chance to
hand over other bytes: rewritten ones are refused anyway, and ones signed
with another trusted key would run other code under the same version. What
is still read per request is the ref: a channel can move.

An entry stays valid while the key that verified its signature is still
trusted by the repository asking: a key dropped from ``trusted`` makes the
version verify afresh, and so be refused.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mayfly.packages.signing import TrustedKeys

if TYPE_CHECKING:
    from mayfly.packages.repository import FetchedPackage

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_VERSIONS", "VerifiedVersions"]

DEFAULT_MAX_VERSIONS = 64
#: Archive bytes kept at most: a warm parent hands its memory to every fork.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class VerifiedVersions:
    """A small LRU of verified :class:`FetchedPackage`, by (name, version)."""

    def __init__(
        self, max_versions: int = DEFAULT_MAX_VERSIONS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_versions = max_versions
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[FetchedPackage, Ed25519PublicKey]] = (
            OrderedDict()
        )
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, version: str, trusted: TrustedKeys) -> FetchedPackage | None:
        """The verified package, if this version verified here with a key ``trusted``
        still holds; None (and the entry forgotten) otherwise."""
        entry = self._entries.get((name, version))
        if entry is None:
            return None
        fetched, key = entry
        if trusted.get(fetched.signature.key_id) != key:
            self._drop((name, version))
            return None
        self._entries.move_to_end((name, version))
        return fetched

    def put(self, fetched: FetchedPackage, key: Ed25519PublicKey) -> None:
        """Keep ``fetched``, whose signature ``key`` verified a moment ago."""
        where = (fetched.manifest.name, fetched.manifest.version)
        self._drop(where)
        if len(fetched.data) > self.max_bytes:
            return
        self._entries[where] = (fetched, key)
        self._bytes += len(fetched.data)
        while len(self._entries) > self.max_versions or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, where: tuple[str, str]) -> None:
        entry = self._entries.pop(where, None)
        if entry is not None:
            self._bytes -= len(entry[0].data)
