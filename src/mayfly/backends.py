"""Builds the configured adapters from :class:`~mayfly.settings.Settings`.

The one place that knows which implementation backs each port, so entry points
stay thin and tests can pass their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mayfly.devices import Inventory, parse_inventory
from mayfly.errors import ConfigError, InventoryError
from mayfly.packages import LocalPackageStore, PackageRepository, PackageStore, TrustedKeys
from mayfly.runtime.eventlog import EventLog
from mayfly.settings import ENV_S3_ACCESS_KEY, ENV_S3_ENDPOINT, ENV_S3_SECRET_KEY, Settings

__all__ = [
    "inventory_loader",
    "load_inventory",
    "load_trusted_keys",
    "open_event_log",
    "open_repository",
    "open_s3_store",
    "open_store",
]


def open_s3_store(settings: Settings, bucket: str, *, create_bucket: bool) -> PackageStore:
    """A store on ``bucket`` with the configured S3 endpoint and credentials."""
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
        raise ConfigError(f"s3://{bucket} needs {', '.join(missing)} to be set")
    # Imported here: the minio client is only paid for when S3 is configured.
    from mayfly.packages.s3store import S3PackageStore

    return S3PackageStore(
        endpoint,
        bucket,
        access_key=access,
        secret_key=secret,
        region=settings.s3_region,
        create_bucket=create_bucket,
    )


def load_inventory(settings: Settings) -> Inventory:
    """The device inventory from a file or an ``s3://BUCKET/KEY`` object."""
    source = settings.inventory
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ConfigError(f"inventory {source!r}: expected s3://BUCKET/KEY")
        raw = open_s3_store(settings, bucket, create_bucket=False).get(key)
        if raw is None:
            raise InventoryError(f"inventory {source} does not exist")
        return parse_inventory(raw, origin=source)
    path = Path(source).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InventoryError(
            f"inventory {path} not found; set MAYFLY_INVENTORY or start "
            "`mayfly devices simulate`, which writes one"
        ) from exc
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {path}: {exc.strerror}") from exc
    return parse_inventory(raw, origin=str(path))


def inventory_loader(settings: Settings) -> Callable[[], Inventory]:
    """A loader that re-reads a file inventory only when the file changed.

    A warm parent loads once and every coordinator it forks inherits the
    parsed inventory; an edited file is picked up on the next request.
    """
    if settings.inventory.startswith("s3://"):
        return lambda: load_inventory(settings)
    path = Path(settings.inventory).expanduser()
    cached: dict[str, object] = {}

    def load() -> Inventory:
        try:
            st = path.stat()
            stamp: object = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is None or cached.get("stamp") != stamp:
            cached["inventory"] = load_inventory(settings)
            cached["stamp"] = stamp
        inventory = cached["inventory"]
        assert isinstance(inventory, Inventory)
        return inventory

    return load


def open_store(settings: Settings) -> PackageStore:
    """The package store that ``settings.store`` names: a folder or ``s3://bucket``."""
    if not settings.store_is_s3:
        return LocalPackageStore(Path(settings.store).expanduser())
    return open_s3_store(settings, settings.s3_bucket, create_bucket=True)


def load_trusted_keys(settings: Settings) -> TrustedKeys:
    """Trusted public keys; a missing default folder simply means none yet."""
    if settings.trusted_keys:
        return TrustedKeys.from_paths(list(settings.trusted_keys))
    return TrustedKeys.from_paths([p for p in settings.trusted_key_paths if p.exists()])


def open_repository(settings: Settings) -> PackageRepository:
    """The package repository over the configured store and trusted keys."""
    return PackageRepository(open_store(settings), load_trusted_keys(settings))


def open_event_log(settings: Settings) -> EventLog:
    """The event log ``settings.event_log`` names: ``kafka://HOST:PORT[,HOST:PORT]``,
    or a SQLite file (the embedded default)."""
    if settings.event_log.startswith("kafka://"):
        bootstrap = settings.event_log.removeprefix("kafka://").strip("/")
        if not bootstrap:
            raise ConfigError(f"event log {settings.event_log!r}: expected kafka://HOST:PORT")
        # Imported here: kafka-python is only paid for when Kafka is configured.
        from mayfly.runtime.kafkalog import KafkaEventLog

        return KafkaEventLog(bootstrap)
    from mayfly.runtime.sqlitelog import SqliteEventLog

    return SqliteEventLog(Path(settings.event_log).expanduser())
