"""The composition root: which implementation backs each port, chosen from
:class:`~mayfly.settings.Settings`.

The one place that knows the adapters (SQLite or Kafka event log, folder or S3
store and archive, file, HTTP or event-log result sink, HTTP devices) and
wires them into a coordinator or an aggregator, so the domain packages import
none of them and entry points stay thin. Adapters that need a client library
(kafka-python, minio) are imported only when configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mayfly.coordinator.sinks import EventLogSink, FileSink, HttpSink, ResultSink
from mayfly.devices.inventory import Inventory, parse_inventory
from mayfly.errors import ConfigError, InventoryError
from mayfly.eventlog import EventLog
from mayfly.events import MayflyEvent
from mayfly.settings import (
    ENV_ARCHIVE,
    ENV_EVENT_LOG,
    ENV_INVENTORY,
    ENV_RESULT_SINK,
    ENV_SHARD_SINK,
    Settings,
    option,
)
from mayfly.topics import Topics

if TYPE_CHECKING:
    # Imported where they are used: `mayfly up` imports this module before it
    # forks its warm parent, and neither process should carry what only the
    # other uses (the package store's signing and manifests, the coordinator,
    # the HTTP driver; the aggregator and the OpenTelemetry SDK).
    from mayfly.aggregator import Aggregator
    from mayfly.aggregator.archive import ResultArchive
    from mayfly.aggregator.ingest import Ingest
    from mayfly.coordinator import Coordinator
    from mayfly.coordinator.runner import TaskStarter
    from mayfly.packages import PackageRepository, PackageStore, TrustedKeys
    from mayfly.telemetry import Telemetry

__all__ = [
    "AggregatorService",
    "build_aggregator",
    "build_coordinator",
    "check_event_log",
    "check_store_folder",
    "event_log_sink",
    "inventory_loader",
    "load_inventory",
    "load_trusted_keys",
    "open_archive",
    "open_event_log",
    "open_repository",
    "open_s3_store",
    "open_shard_sink",
    "open_sink",
    "open_store",
]


def open_s3_store(settings: Settings, bucket: str, *, create_bucket: bool) -> PackageStore:
    """A store on ``bucket`` with the configured S3 endpoint and credentials."""
    endpoint, access, secret = _s3_settings(settings, bucket)
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


def _s3_settings(settings: Settings, bucket: str) -> tuple[str, str, str]:
    """The S3 endpoint and credentials; ConfigError naming each one missing."""
    endpoint, access, secret = settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key
    if not (endpoint and access and secret):
        missing = [
            _named(field)
            for field, value in (
                ("s3_endpoint", endpoint),
                ("s3_access_key", access),
                ("s3_secret_key", secret),
            )
            if not value
        ]
        listed = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        raise ConfigError(f"s3://{bucket} needs {listed} to be set")
    return endpoint, access, secret


def _named(field: str) -> str:
    """A setting as a user would set it: its variable, and its flag if it has one."""
    opt = option(field)
    return f"{opt.env} ({opt.flag})" if opt.flag else opt.env


def load_inventory(settings: Settings) -> Inventory:
    """The device inventory from a file or an ``s3://BUCKET/KEY`` object."""
    source = settings.inventory
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ConfigError(f"{ENV_INVENTORY}={source!r}: expected s3://BUCKET/KEY")
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


def open_store(settings: Settings, *, require_packages: bool = False) -> PackageStore:
    """The package store that ``settings.store`` names: a folder or ``s3://bucket``.

    A folder that does not exist yet is a new, empty store, which publishing
    (``mayfly pkg publish``) creates.

    Args:
        require_packages: for what only runs packages (``mayfly up``, job mode): a
            folder that does not exist or holds no package is a configuration
            error, so a mistyped ``MAYFLY_STORE`` or ``MAYFLY_HOME`` is said at
            start instead of every request being rejected ``unknown_task``.

    Raises:
        ConfigError: ``require_packages`` and no package in the folder, saying
            whether the path looks wrong or the home is new.
    """
    from mayfly.packages.store import LocalPackageStore

    if settings.store_is_s3:
        return open_s3_store(settings, settings.s3_bucket, create_bucket=True)
    root = Path(settings.store).expanduser()
    if require_packages:
        _require_packages(settings, root)
    return LocalPackageStore(root)


def check_store_folder(settings: Settings) -> None:
    """Refuse now, without the signing, manifest or S3 client code, a store
    folder that holds no package (a typo, a new home) or an S3 store without
    its settings; an S3 store's bucket is checked where it is opened.

    Raises:
        ConfigError: saying whether the path looks wrong or the home is new,
            or which S3 setting is missing.
    """
    if settings.store_is_s3:
        _s3_settings(settings, settings.s3_bucket)
    else:
        _require_packages(settings, Path(settings.store).expanduser())


def _require_packages(settings: Settings, root: Path) -> None:
    from mayfly.packages.store import SIGNATURE

    try:
        # A version is published once its signature is written (last).
        if root.is_dir() and next(root.glob(f"*/*/{SIGNATURE}"), None) is not None:
            return
    except OSError as exc:
        raise ConfigError(f"{_named('store')}={settings.store!r}: {exc.strerror}") from exc
    publish = "`mayfly pkg publish FOLDER`"
    if root != settings.home / "packages":
        if not root.exists():
            why = "no such folder: check the path"
        elif not root.is_dir():
            why = "not a folder: check the path"
        else:
            why = "holds no task package: check the path"
        raise ConfigError(
            f"{_named('store')}={settings.store!r}: {why}, or publish to it with {publish}"
        )
    if not settings.home.exists():
        raise ConfigError(
            f"{_named('home')}={str(settings.home)!r}: no such folder: check the path, "
            f"or start a new home by publishing a package with {publish}"
        )
    raise ConfigError(
        f"no task package in {root} (the store of this home) yet: publish one with "
        f"{publish}, or point {_named('store')} at your store"
    )


def load_trusted_keys(settings: Settings) -> TrustedKeys:
    """Trusted public keys; a missing default folder simply means none yet."""
    from mayfly.packages.signing import TrustedKeys

    if settings.trusted_keys:
        return TrustedKeys.from_paths(list(settings.trusted_keys))
    return TrustedKeys.from_paths([p for p in settings.trusted_key_paths if p.exists()])


def open_repository(settings: Settings, *, require_packages: bool = False) -> PackageRepository:
    """The package repository over the configured store and trusted keys
    (``require_packages``: see :func:`open_store`)."""
    from mayfly.packages.repository import PackageRepository

    store = open_store(settings, require_packages=require_packages)
    return PackageRepository(store, load_trusted_keys(settings))


def open_event_log(settings: Settings) -> EventLog:
    """The event log ``settings.event_log`` names: ``kafka://HOST:PORT[,HOST:PORT]``,
    or a SQLite file (the embedded default)."""
    if settings.event_log.startswith("kafka://"):
        bootstrap = settings.event_log.removeprefix("kafka://").strip("/")
        if not bootstrap:
            raise ConfigError(f"{ENV_EVENT_LOG}={settings.event_log!r}: expected kafka://HOST:PORT")
        return _kafka_log(bootstrap)
    from mayfly.eventlog.sqlite import SqliteEventLog

    return SqliteEventLog(Path(settings.event_log).expanduser())


def check_event_log(settings: Settings) -> None:
    """Open a SQLite event log now and read it whole (``PRAGMA quick_check``), so
    a foreign, garbage or corrupt file stops a start in one line. Kafka is met
    on first use, as before.

    Raises:
        EventLogFileError: naming the file and what is wrong with it.
    """
    if settings.event_log_is_kafka:
        return
    from mayfly.eventlog.sqlite import SqliteEventLog

    with SqliteEventLog(Path(settings.event_log).expanduser()) as log:
        log.check()


def _kafka_log(bootstrap: str) -> EventLog:
    # Imported here: kafka-python is only paid for when Kafka is configured.
    from mayfly.eventlog.kafka import KafkaEventLog

    return KafkaEventLog(bootstrap)


def open_sink(settings: Settings, target: str | None = None) -> ResultSink:
    """The result sink a target names (default ``settings.result_sink``):

    - ``-``: structured JSON lines on stdout;
    - ``file:PATH`` or a plain path: structured JSON lines appended to PATH;
    - ``http://...`` / ``https://...``: a binary-mode CloudEvent POST;
    - ``kafka://HOST:PORT[,HOST:PORT]/TOPIC``: a binary-mode record on TOPIC
      through the Kafka event log's producer, a rejection also on the
      installation's dead-letter topic (``MAYFLY_TOPIC_PREFIX``).
    """
    target = settings.result_sink if target is None else target
    if target in ("", "-", "stdout"):
        return FileSink(None)
    if target.startswith(("http://", "https://")):
        return HttpSink(target)
    if target.startswith("kafka://"):
        bootstrap, _, topic = target.removeprefix("kafka://").partition("/")
        if not bootstrap or not topic:
            raise ConfigError(f"{ENV_RESULT_SINK}={target!r}: expected kafka://HOST:PORT/TOPIC")
        return EventLogSink(_kafka_log(bootstrap), settings.topics, results=topic, owns_log=True)
    return FileSink(Path(target.removeprefix("file:")))


def open_shard_sink(settings: Settings) -> ResultSink | None:
    """Where the coordinator function publishes the shards of a large request
    (``settings.shard_sink``); None when nowhere, and requests run whole:

    - ``kafka://HOST:PORT[,HOST:PORT]``: on the installation's lanes;
    - ``http://...`` / ``https://...``: a binary-mode POST to the URL, its
      ``{priority}`` replaced by the shard's priority (a KafkaSink per lane).
    """
    target = settings.shard_sink
    if not target:
        return None
    if target.startswith(("http://", "https://")):
        return HttpSink(target)
    bootstrap = target.removeprefix("kafka://")
    if not target.startswith("kafka://") or not bootstrap or "/" in bootstrap:
        raise ConfigError(
            f"{ENV_SHARD_SINK}={target[:80]!r}: expected kafka://HOST:PORT or an http(s) URL"
        )
    return EventLogSink(_kafka_log(bootstrap), settings.topics, owns_log=True)


def event_log_sink(log: EventLog, topics: Topics) -> ResultSink:
    """The sink of a coordinator that the local runtime forked: the runtime's own log."""
    return EventLogSink(log, topics)


def build_coordinator(
    settings: Settings,
    mode: str,
    *,
    require_packages: bool = False,
    starter: TaskStarter | None = None,
) -> Coordinator:
    """A coordinator wired to the configured store, inventory and HTTP devices
    (``require_packages``: see :func:`open_store`; ``starter``: where its task
    processes come from, by default forked from it)."""
    from mayfly.coordinator.core import Coordinator, CoordinatorOptions
    from mayfly.devices.http import HttpDriver

    return Coordinator(
        open_repository(settings, require_packages=require_packages),
        inventory=inventory_loader(settings),
        driver_factory=HttpDriver,
        options=CoordinatorOptions(
            cache_dir=settings.package_cache,
            mode=mode,
            max_processes=settings.max_processes,
            shard_size=settings.shard_size,
        ),
        starter=starter,
    )


def open_archive(settings: Settings, location: str | None = None) -> ResultArchive:
    """The results archive (default ``settings.archive``): a folder, or
    ``s3://BUCKET[/PREFIX]`` with the configured S3 endpoint and credentials
    (the prefix defaults to ``archive``).

    Raises:
        ConfigError: for an s3:// location without a bucket or S3 settings.
    """
    from mayfly.aggregator.archive import BucketResultArchive, LocalResultArchive

    location = location or settings.archive
    if not location.startswith("s3://"):
        return LocalResultArchive(Path(location).expanduser())
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"{ENV_ARCHIVE}={location!r}: expected s3://BUCKET[/PREFIX]")
    store = open_s3_store(settings, bucket, create_bucket=False)
    return BucketResultArchive(store, prefix.strip("/") or "archive")


@dataclass
class AggregatorService:
    """The aggregator with the ingest, telemetry and archive it was built with."""

    ingest: Ingest
    telemetry: Telemetry
    archive: ResultArchive

    @property
    def aggregator(self) -> Aggregator:
        assert self.ingest.aggregator is not None
        return self.ingest.aggregator

    def handle_http(self, headers: Mapping[str, str], body: bytes) -> int:
        """One CloudEvent delivery; the HTTP status to answer with an empty body."""
        return self.ingest.http(headers, body)

    def describe(self) -> str:
        return f"traces to {self.telemetry.destination}, archive {self.archive.describe()}"

    def flush(self) -> bool:
        """Export the spans and measurements recorded so far."""
        return self.telemetry.flush()

    def close(self) -> None:
        """Flush and stop telemetry (call on shutdown)."""
        self.telemetry.shutdown()


#: How long the aggregator waits for a batch's spans to be exported before it
#: reads on (their results are committed after a later export then).
_EXPORT_WAIT_MS = 5_000


def build_aggregator(
    settings: Settings,
    *,
    service_name: str = "mayfly-aggregator",
    messaging_system: str | None = None,
    on_events: Callable[[list[MayflyEvent]], None] | None = None,
) -> AggregatorService:
    """The aggregator, its telemetry (OTLP endpoint or trace file) and its archive.

    Args:
        messaging_system: ``messaging.system`` of the spans; default the
            configured event log's (``kafka`` or ``sqlite``).
        on_events: called with each decoded batch after it was aggregated.

    Raises:
        ConfigError: for invalid settings.
    """
    from mayfly.aggregator import Aggregator
    from mayfly.aggregator.ingest import Ingest
    from mayfly.eventlog.publisher import server_of
    from mayfly.telemetry import configure_telemetry  # the SDK: only where traces are made

    archive = open_archive(settings)
    telemetry = configure_telemetry(
        service_name,
        otlp_endpoint=settings.otlp_endpoint,
        trace_file=settings.trace_file,
        metrics_endpoint=settings.otlp_metrics_endpoint,
    )
    aggregator = Aggregator(
        telemetry.bulk_tracer("mayfly.aggregator"),
        telemetry.meter("mayfly.aggregator"),
        archive,
        messaging_system=messaging_system or settings.messaging_system,
        destination=settings.topics.results,
        server=server_of(settings.event_log),
    )
    # Bounded: a trace backend that is down holds the commits, not the loop.
    ingest = Ingest(
        aggregator, on_events=on_events, exported=lambda: telemetry.flush_traces(_EXPORT_WAIT_MS)
    )
    return AggregatorService(ingest, telemetry, archive)
