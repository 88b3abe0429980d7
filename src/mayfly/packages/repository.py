"""Publishing, resolving and fetching signed, immutable package versions.

Bucket layout (the same in a local folder)::

    <name>/<version>/package.tar.gz   the deterministic archive
    <name>/<version>/manifest.json    its manifest, readable without unpacking
    <name>/<version>/package.sig      Ed25519 signature over name, version, digests
    <name>/channels/<channel>         the version a channel points at

A version is visible once its signature is written, and the signature is
written last, so a reader never resolves a half-published version.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import semver

from mayfly.errors import (
    ImmutableVersionError,
    IntegrityError,
    PackageError,
    PackageNotFoundError,
)
from mayfly.packages.archive import (
    ArchiveEntry,
    ArchiveLimits,
    BuiltPackage,
    archive_tree,
    digest_of,
    extract_archive,
    read_manifest_from_archive,
    remove_tree,
    tree_mismatch,
)
from mayfly.packages.manifest import NAME_PATTERN, Manifest, parse_manifest
from mayfly.packages.signing import Signature, TrustedKeys, verify
from mayfly.packages.snapshot import Snapshot, check_started, settled, snapshot_tree
from mayfly.packages.store import ARCHIVE, MANIFEST, SIGNATURE, PackageStore
from mayfly.packages.verified import VerifiedVersions

__all__ = [
    "DEFAULT_CHANNEL",
    "FetchedPackage",
    "PackageRepository",
    "PublishResult",
    "VersionInfo",
    "parse_ref",
    "verify_package",
]

DEFAULT_CHANNEL = "stable"
_CHANNEL = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_NAME = re.compile(NAME_PATTERN)
#: Extract-and-check rounds before giving up on a cache folder that keeps changing.
_CACHE_ATTEMPTS = 3
#: Cache folders whose snapshot one package keeps (one per cache root in use).
_FOLDERS_REMEMBERED = 4
_LOG = logging.getLogger("mayfly.packages")


class _Checked:
    """What a :class:`FetchedPackage` learnt of its archive and its extractions.

    Derived from verified, immutable bytes, so kept for as long as they are.
    """

    def __init__(self) -> None:
        self.trees: dict[ArchiveLimits, dict[str, ArchiveEntry]] = {}
        self.folders: dict[tuple[str, ArchiveLimits], Snapshot] = {}


@dataclass(frozen=True)
class FetchedPackage:
    """A package version whose digest and signature verified."""

    manifest: Manifest
    digest: str
    data: bytes
    signature: Signature
    _checked: _Checked = field(
        default_factory=_Checked, init=False, repr=False, compare=False, hash=False
    )

    def materialise(self, cache_root: Path, limits: ArchiveLimits | None = None) -> Path:
        """The verified archive extracted into ``cache_root/<digest hex>``, read-only.

        What runs is what was verified: a folder already there is checked
        against these (verified) archive bytes first, every file hashed, and
        one that differs in any way (a changed, added or missing file, a mode,
        an owner, a link) is discarded and extracted afresh, with a warning.
        ``__pycache__`` folders Python wrote there are deleted, never trusted.

        A folder this package checked in full before is not hashed again while
        the metadata of every entry in it, ctime included, is what it was then
        (:mod:`mayfly.packages.snapshot` says why that is sound); any
        difference, or a folder checked too recently to tell, means the full
        check.

        Raises:
            UnsafeArchiveError: if the archive holds a member extraction refuses.
            IntegrityError: if the folder keeps changing while it is checked.
        """
        where = {"package": self.manifest.name, "version": self.manifest.version}
        dest = cache_root / self.digest.removeprefix("sha256:")
        limits = limits or ArchiveLimits()
        memo = self._checked
        folder = (str(dest.absolute()), limits)
        known = memo.folders.pop(folder, None)
        if known is not None and snapshot_tree(dest) == known:
            memo.folders[folder] = known
            return dest
        expected = memo.trees.get(limits)
        if expected is None:
            expected = memo.trees[limits] = archive_tree(self.data, limits)
        for _ in range(_CACHE_ATTEMPTS):
            if not os.path.lexists(dest):
                extract_archive(self.data, dest, limits, read_only=True)
            started = check_started()
            problem = tree_mismatch(dest, expected)
            if problem is None:
                checked = snapshot_tree(dest)
                if checked is not None and settled(checked, started):
                    if len(memo.folders) >= _FOLDERS_REMEMBERED:
                        memo.folders.pop(next(iter(memo.folders)))
                    memo.folders[folder] = checked
                return dest
            _LOG.warning(
                "package cache %s of %s %s differs from its signed archive (%s): extracting "
                "it afresh",
                dest,
                self.manifest.name,
                self.manifest.version,
                problem,
            )
            _discard(dest, problem, where)
        raise IntegrityError(f"package cache {dest} keeps changing while it is checked", **where)


def _discard(path: Path, why: str, where: dict[str, str]) -> None:
    """Move a cache folder out of the way at once (a rename), then delete it."""
    aside = path.with_name(f".discard-{path.name[:16]}-{secrets.token_hex(4)}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return  # someone discarded it first
    except OSError as exc:
        raise IntegrityError(
            f"package cache {path} differs from the signed archive ({why}) and cannot be "
            f"moved aside: {exc.strerror}",
            **where,
        ) from exc
    remove_tree(aside)
    if os.path.lexists(aside):
        _LOG.warning("could not delete the discarded package cache %s", aside)


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    digest: str
    created: bool
    """False when the same bytes were already published (a no-op)."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    digest: str
    channels: tuple[str, ...]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name[@version|@channel]`` into its parts."""
    name, _, at = ref.partition("@")
    return name, at or None


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise PackageError(f"invalid package name {name!r}: use lowercase letters, digits, '-'")


def _check_channel(channel: str, name: str) -> None:
    if not _CHANNEL.match(channel) or semver.Version.is_valid(channel):
        raise PackageError(f"invalid channel name {channel!r}", package=name)


def verify_package(
    data: bytes, sig: Signature, manifest_json: bytes | None, trusted: TrustedKeys
) -> Manifest:
    """Verify archive bytes and their signature; return the signed manifest.

    The manifest inside the archive must be the signed one; a separately
    stored ``manifest.json``, when given, must match it byte for byte.

    Raises:
        IntegrityError: naming the package, version and the reason.
    """
    where = {"package": sig.name, "version": sig.version}
    digest = digest_of(data)
    if digest != sig.digest:
        raise IntegrityError(
            f"archive digest {digest} does not match the signed digest {sig.digest} "
            "(the archive was altered or corrupted)",
            **where,
        )
    try:
        manifest = read_manifest_from_archive(data)
    except PackageError as exc:
        raise IntegrityError(f"archive unreadable: {exc.reason}", **where) from exc
    canonical = manifest.to_json()
    verify(
        sig,
        trusted,
        name=manifest.name,
        version=manifest.version,
        digest=digest,
        manifest_digest=digest_of(canonical),
    )
    if manifest_json is not None and manifest_json != canonical:
        raise IntegrityError("stored manifest.json differs from the signed manifest", **where)
    return manifest


class PackageRepository:
    """Signed, immutable package versions and movable channels over a store.

    :meth:`fetch` keeps what it verified (:mod:`mayfly.packages.verified`): a
    later fetch of the same version resolves its ref and reads nothing else.
    """

    def __init__(
        self,
        store: PackageStore,
        trusted: TrustedKeys,
        *,
        verified: VerifiedVersions | None = None,
    ) -> None:
        self.store = store
        self.trusted = trusted
        self.verified = verified if verified is not None else VerifiedVersions()
        self._pins: dict[tuple[str, str], str] = {}

    def pinned(self, name: str, ref: str | None, version: str) -> PackageRepository:
        """This repository, sharing its verified versions, but with ``ref`` of
        ``name`` taken as resolved to ``version`` by :meth:`fetch`.

        For a process forked right after this one resolved ``ref``: its view of
        the channel is then as fresh as its own resolve would have been, and it
        spares the store a read. Hand it to nothing that lives on.
        """
        view = PackageRepository(self.store, self.trusted, verified=self.verified)
        view._pins = {**self._pins, (name, ref or DEFAULT_CHANNEL): version}
        return view

    def publish(self, built: BuiltPackage, sig: Signature) -> PublishResult:
        """Publish one version. Same bytes again is a no-op; other bytes are refused.

        Raises:
            IntegrityError: if the signature does not verify with a trusted key.
            ImmutableVersionError: if the version exists with other bytes.
        """
        m = built.manifest
        verify_package(built.data, sig, None, self.trusted)
        prefix = f"{m.name}/{m.version}"
        created = self.store.put_new(f"{prefix}/{ARCHIVE}", built.data)
        # Read back even after a create: a store without an atomic
        # create-if-absent may have let a racing publisher's bytes win.
        existing = self.store.get(f"{prefix}/{ARCHIVE}")
        if existing != built.data:
            raise ImmutableVersionError(
                f"version already published with digest "
                f"{digest_of(existing or b'')}; this build is {built.digest}. "
                "Versions are immutable: bump the version in manifest.json",
                package=m.name,
                version=m.version,
            )
        # Completes a publish that stopped half-way; never replaces what exists.
        self.store.put_new(f"{prefix}/{MANIFEST}", m.to_json())
        self.store.put_new(f"{prefix}/{SIGNATURE}", sig.to_json())
        return PublishResult(manifest=m, digest=built.digest, created=created)

    def channels(self, name: str) -> dict[str, str]:
        _check_name(name)
        prefix = f"{name}/channels/"
        found = {}
        for key in self.store.list_keys(prefix):
            raw = self.store.get(key)
            if raw is not None:
                found[key.removeprefix(prefix)] = raw.decode().strip()
        return found

    def versions(self, name: str) -> list[str]:
        """Published versions of ``name``, oldest first by semver precedence."""
        _check_name(name)
        found = []
        for key in self.store.list_keys(f"{name}/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == SIGNATURE and semver.Version.is_valid(parts[1]):
                found.append(parts[1])
        return sorted(found, key=semver.Version.parse)

    def check(self) -> None:
        """Ask the store for one key no package has: an unreachable store or bad
        credentials raise :class:`~mayfly.errors.StoreError` now, not on the first
        request. Cheaper than a listing, which grows with the bucket."""
        self.store.get("mayfly-store-check")

    def packages(self) -> list[str]:
        names = {key.split("/", 1)[0] for key in self.store.list_keys("")}
        return sorted(n for n in names if _NAME.match(n))

    def describe(self, name: str) -> list[VersionInfo]:
        """Every version with its digest and the channels pointing at it."""
        channels = self.channels(name)
        infos = []
        for version in self.versions(name):
            raw = self.store.get(f"{name}/{version}/{SIGNATURE}")
            digest = Signature.from_json(raw, package=name, version=version).digest if raw else ""
            on = tuple(sorted(c for c, v in channels.items() if v == version))
            infos.append(VersionInfo(name, version, digest, on))
        return infos

    def resolve(self, name: str, ref: str | None = None) -> str:
        """The version that ``ref`` (a version, a channel, or None for stable) names."""
        _check_name(name)
        ref = ref or DEFAULT_CHANNEL
        if semver.Version.is_valid(ref):
            if self.store.get(f"{name}/{ref}/{SIGNATURE}") is None:
                known = self.versions(name)
                hint = f" (published versions: {', '.join(known)})" if known else ""
                if not known:
                    hint = self._did_you_mean(name)
                raise PackageNotFoundError(
                    f"version not published in {self.store.describe()}{hint}",
                    package=name,
                    version=ref,
                )
            return ref
        _check_channel(ref, name)
        raw = self.store.get(f"{name}/channels/{ref}")
        if raw is None:
            known = self.versions(name)
            if not known:
                raise PackageNotFoundError(
                    f"package not published in {self.store.describe()}{self._did_you_mean(name)}",
                    package=name,
                )
            raise PackageNotFoundError(
                f"no channel {ref!r} in {self.store.describe()} "
                f"(published versions: {', '.join(known)})",
                package=name,
            )
        return raw.decode().strip()

    def _did_you_mean(self, name: str) -> str:
        """`` (did you mean 'reboot'?)`` for a name close to a published one; ''
        otherwise. Only on the way to an error: it lists the store."""
        close = difflib.get_close_matches(name, self.packages(), n=3, cutoff=0.6)
        if not close:
            return ""
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"

    def fetch(self, name: str, ref: str | None = None) -> FetchedPackage:
        """Resolve, download and verify a version.

        The ref is resolved every time (a channel moves); a version that verified
        here before, with a key still trusted, is reused without reading its
        archive again.

        Raises:
            PackageNotFoundError: unknown package, version or channel.
            IntegrityError: altered bytes, a missing or untrusted signature.
        """
        version = self._pins.get((name, ref or DEFAULT_CHANNEL)) or self.resolve(name, ref)
        known = self.verified.get(name, version, self.trusted)
        if known is not None:
            return known
        prefix = f"{name}/{version}"
        data = self.store.get(f"{prefix}/{ARCHIVE}")
        raw_sig = self.store.get(f"{prefix}/{SIGNATURE}")
        if data is None or raw_sig is None:
            raise PackageNotFoundError(
                f"version incomplete in {self.store.describe()}", package=name, version=version
            )
        sig = Signature.from_json(raw_sig, package=name, version=version)
        if (sig.name, sig.version) != (name, version):
            raise IntegrityError(
                f"signature file is for {sig.name} {sig.version}", package=name, version=version
            )
        manifest_json = self.store.get(f"{prefix}/{MANIFEST}")
        manifest = verify_package(data, sig, manifest_json, self.trusted)
        fetched = FetchedPackage(manifest=manifest, digest=sig.digest, data=data, signature=sig)
        key = self.trusted.get(sig.key_id)
        if key is not None:  # it is: verify_package just used it
            self.verified.put(fetched, key)
        return fetched

    def manifest(self, name: str, ref: str | None = None) -> Manifest:
        """The stored manifest of a version, without downloading the archive.

        Unverified: use :meth:`fetch` before running anything.
        """
        version = self.resolve(name, ref)
        raw = self.store.get(f"{name}/{version}/{MANIFEST}")
        if raw is None:
            raise PackageNotFoundError("manifest missing", package=name, version=version)
        return parse_manifest(raw, origin=f"{name}/{version}/{MANIFEST}")

    def promote(self, name: str, version: str, channel: str) -> str | None:
        """Point ``channel`` at a published, verifying version.

        Returns:
            The version the channel pointed at before, if any.
        """
        _check_channel(channel, name)
        self.fetch(name, version)  # refuse to promote what would not verify
        previous = self.channels(name).get(channel)
        self.store.put(f"{name}/channels/{channel}", version.encode() + b"\n")
        return previous
