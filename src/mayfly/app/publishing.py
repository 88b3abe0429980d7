"""Publishing package folders into a Mayfly home in one call.

Making a key, building, signing and publishing a package folder and pointing a
channel at it is how the demo starts, and every test of a coordinator or a
runtime and every benchmark (through :mod:`mayfly.testing`); this is that, once.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mayfly.app.wiring import open_repository
from mayfly.packages import (
    PackageRepository,
    PublishResult,
    build_package,
    generate_keypair,
    load_private_key,
    sign_built,
)
from mayfly.settings import Settings

__all__ = ["ensure_signing_key", "publish_folder", "publish_folders"]


def ensure_signing_key(settings: Settings) -> Path:
    """The settings' signing key, made (and trusted under ``$MAYFLY_HOME/trusted``)
    if it does not exist yet."""
    key = settings.signing_key_path
    if not key.exists():
        generate_keypair(key, settings.home / "trusted" / f"{key.stem}.pub")
    return key


def publish_folder(
    settings: Settings,
    folder: Path,
    *,
    channel: str | None = "stable",
    repository: PackageRepository | None = None,
) -> PublishResult:
    """Build, sign (with the settings' key, made if missing) and publish a package
    folder, and point ``channel`` at it.

    A ``repository`` opened before the key was made does not trust it yet: make
    the key first (:func:`ensure_signing_key`), or let this open one.
    """
    ensure_signing_key(settings)
    repo = repository or open_repository(settings)
    built = build_package(folder)
    result = repo.publish(built, sign_built(load_private_key(settings.signing_key_path), built))
    if channel:
        repo.promote(built.manifest.name, built.manifest.version, channel)
    return result


def publish_folders(
    settings: Settings, folders: Iterable[Path], *, channel: str | None = "stable"
) -> list[PublishResult]:
    """:func:`publish_folder` for each folder, over one repository."""
    ensure_signing_key(settings)
    repo = open_repository(settings)
    return [publish_folder(settings, f, channel=channel, repository=repo) for f in folders]
