"""Task packages: manifests, deterministic archives, signatures, and the repository."""

from __future__ import annotations

from mayfly.packages.archive import (
    ArchiveLimits,
    BuiltPackage,
    build_package,
    digest_of,
    extract_archive,
    read_manifest_from_archive,
)
from mayfly.packages.manifest import Limits, Manifest, load_manifest, parse_manifest
from mayfly.packages.repository import (
    DEFAULT_CHANNEL,
    FetchedPackage,
    PackageRepository,
    PublishResult,
    VersionInfo,
    parse_ref,
    verify_package,
)
from mayfly.packages.signing import (
    Signature,
    TrustedKeys,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign,
    sign_built,
)
from mayfly.packages.store import LocalPackageStore, PackageStore

__all__ = [
    "DEFAULT_CHANNEL",
    "ArchiveLimits",
    "BuiltPackage",
    "FetchedPackage",
    "Limits",
    "LocalPackageStore",
    "Manifest",
    "PackageRepository",
    "PackageStore",
    "PublishResult",
    "Signature",
    "TrustedKeys",
    "VersionInfo",
    "build_package",
    "digest_of",
    "extract_archive",
    "generate_keypair",
    "load_manifest",
    "load_private_key",
    "load_public_key",
    "parse_manifest",
    "parse_ref",
    "read_manifest_from_archive",
    "sign",
    "sign_built",
    "verify_package",
]
