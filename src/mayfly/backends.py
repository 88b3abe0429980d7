"""Builds the configured adapters from :class:`~mayfly.settings.Settings`.

The one place that knows which implementation backs each port, so entry points
stay thin and tests can pass their own.
"""

from __future__ import annotations

from pathlib import Path

from mayfly.errors import ConfigError
from mayfly.packages import LocalPackageStore, PackageRepository, PackageStore, TrustedKeys
from mayfly.settings import ENV_S3_ACCESS_KEY, ENV_S3_ENDPOINT, ENV_S3_SECRET_KEY, Settings

__all__ = ["load_trusted_keys", "open_repository", "open_store"]


def open_store(settings: Settings) -> PackageStore:
    """The package store that ``settings.store`` names: a folder or ``s3://bucket``."""
    if not settings.store_is_s3:
        return LocalPackageStore(Path(settings.store).expanduser())
    endpoint, access, secret = settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key
    if not (endpoint and access and secret):
        missing = [
            name
            for name, value in (
                (ENV_S3_ENDPOINT, endpoint),
                (ENV_S3_ACCESS_KEY, access),
                (ENV_S3_SECRET_KEY, secret),
            )
            if not value
        ]
        raise ConfigError(f"store {settings.store} needs {', '.join(missing)} to be set")
    # Imported here: the minio client is only paid for when S3 is configured.
    from mayfly.packages.s3store import S3PackageStore

    return S3PackageStore(
        endpoint,
        settings.s3_bucket,
        access_key=access,
        secret_key=secret,
        region=settings.s3_region,
        create_bucket=True,
    )


def load_trusted_keys(settings: Settings) -> TrustedKeys:
    """Trusted public keys; a missing default folder simply means none yet."""
    if settings.trusted_keys:
        return TrustedKeys.from_paths(list(settings.trusted_keys))
    return TrustedKeys.from_paths([p for p in settings.trusted_key_paths if p.exists()])


def open_repository(settings: Settings) -> PackageRepository:
    """The package repository over the configured store and trusted keys."""
    return PackageRepository(open_store(settings), load_trusted_keys(settings))
