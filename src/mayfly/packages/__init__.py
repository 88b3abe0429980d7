"""Task packages: manifests, deterministic archives, signatures, and the repository."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mayfly._lazy import exports

if TYPE_CHECKING:
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
else:
    # Imported on first use: a check of the store folder (``mayfly up``, before
    # it forks) needs none of the signing or manifest code.
    __getattr__, __dir__ = exports(
        __name__,
        {
            "ArchiveLimits": "mayfly.packages.archive",
            "BuiltPackage": "mayfly.packages.archive",
            "build_package": "mayfly.packages.archive",
            "digest_of": "mayfly.packages.archive",
            "extract_archive": "mayfly.packages.archive",
            "read_manifest_from_archive": "mayfly.packages.archive",
            "Limits": "mayfly.packages.manifest",
            "Manifest": "mayfly.packages.manifest",
            "load_manifest": "mayfly.packages.manifest",
            "parse_manifest": "mayfly.packages.manifest",
            "DEFAULT_CHANNEL": "mayfly.packages.repository",
            "FetchedPackage": "mayfly.packages.repository",
            "PackageRepository": "mayfly.packages.repository",
            "PublishResult": "mayfly.packages.repository",
            "VersionInfo": "mayfly.packages.repository",
            "parse_ref": "mayfly.packages.repository",
            "verify_package": "mayfly.packages.repository",
            "Signature": "mayfly.packages.signing",
            "TrustedKeys": "mayfly.packages.signing",
            "generate_keypair": "mayfly.packages.signing",
            "load_private_key": "mayfly.packages.signing",
            "load_public_key": "mayfly.packages.signing",
            "sign": "mayfly.packages.signing",
            "sign_built": "mayfly.packages.signing",
            "LocalPackageStore": "mayfly.packages.store",
            "PackageStore": "mayfly.packages.store",
        },
    )

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
