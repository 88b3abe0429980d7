"""Publishing package folders into a Mayfly home in one call.

Making a key, building, signing and publishing a package folder and pointing a
channel at it is how the demo starts, and every test of a coordinator or a
runtime and every benchmark (through :mod:`mayfly.testing`); this is that, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

from mayfly.app.wiring import build_coordinator, open_repository
from mayfly.coordinator.outline import Outline, check_rollback, outline
from mayfly.errors import ConfigError, EventLogError, MayflyError, PreflightError
from mayfly.eventlog import EventLog
from mayfly.events import TaskRequest
from mayfly.packages import (
    PackageRepository,
    PublishResult,
    build_package,
    generate_keypair,
    load_private_key,
    sign_built,
)
from mayfly.settings import Settings

__all__ = [
    "ensure_signing_key",
    "lanes_note",
    "plan_requests",
    "preflight",
    "preflight_log",
    "publish_folder",
    "publish_folders",
]


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
    built = build_package(folder, wheel_cache=settings.wheel_cache)
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


def preflight(settings: Settings, requests: Sequence[TaskRequest]) -> None:
    """Check every request as its coordinator will, before any is published:
    the package (resolved, fetched, verified), the params against its schema,
    the targets in the inventory (the store and inventory of ``settings``).

    For fast feedback only: the runtime checks each request again when it
    runs it, and its rejection is the final word.

    Raises:
        PreflightError: naming the first request that fails and why.
        ConfigError: a setting the check cannot work with (one line, exit 2).
    """
    coordinator = build_coordinator(settings, "local")
    checked: set[str] = set()
    for number, request in enumerate(requests, 1):
        alike = _alike(request)
        if alike in checked:
            continue
        try:
            _, targets = coordinator.preflight(request)
            check_rollback(coordinator, request, [d.id for d in targets])
        except ConfigError:
            raise
        except MayflyError as exc:
            which = f"request {number} of {len(requests)}" if len(requests) > 1 else "request"
            message = (
                f"{which} ({request.task}): {exc}; nothing was published "
                "(--no-validate publishes without this check)"
            )
            raise PreflightError(message, exc) from exc
        checked.add(alike)


def preflight_log(settings: Settings) -> str | None:
    """Check, before the log is opened (which would make it), that a runtime
    reads the embedded log the requests go to: a file at a path of its own
    (``--event-log``, ``MAYFLY_EVENT_LOG``) that does not exist is a typo or a
    log no ``mayfly up`` serves, and the requests would wait there forever.

    Returns:
        A note for the home's own log when it does not exist yet (a runtime of
        this home reads it once started); None otherwise, and for Kafka
        (:func:`lanes_note`).

    Raises:
        PreflightError: naming the file; nothing is published.
    """
    if settings.event_log_is_kafka:
        return None
    path = Path(settings.event_log).expanduser()
    if path.exists():
        return None
    if path.absolute() == settings.home_event_log.absolute():
        return (
            f"note: no runtime has opened {path} yet; the requests wait there"
            " until `mayfly up` starts in this home"
        )
    message = (
        f"no runtime has initialised the event log {path} (no such file): check"
        " --event-log or MAYFLY_EVENT_LOG, or start `mayfly up` on it first;"
        " nothing was published (--no-validate publishes without this check)"
    )
    raise PreflightError(message, EventLogError(f"{path}: no such file"))


def lanes_note(log: EventLog, settings: Settings) -> str | None:
    """A note when no runtime has served the installation's lanes yet on Kafka
    (a new prefix, or a misspelt one): the requests wait until a runtime with
    that prefix starts. Not an error: a publisher may well come first."""
    exists = getattr(log, "topic_exists", None)
    if not settings.event_log_is_kafka or exists is None:
        return None
    lane = settings.topics.lane("normal")
    try:
        if exists(lane):
            return None
    except EventLogError:
        return None  # the publish itself says what is wrong with the broker
    return (
        f"note: no runtime has served the lanes of prefix {settings.topics.prefix!r}"
        f" on {log.describe()} yet (no topic {lane}); the requests wait there until"
        " a `mayfly up` with this prefix starts"
    )


def plan_requests(settings: Settings, requests: Sequence[TaskRequest]) -> list[Outline]:
    """What each request would do (:func:`~mayfly.coordinator.outline.outline`),
    against the store and inventory of ``settings``; nothing is published or run.

    Raises:
        PreflightError: naming the first request its coordinator would reject.
        ConfigError: a setting the plan cannot work with.
    """
    coordinator = build_coordinator(settings, "local")
    found = []
    planned: dict[str, Outline] = {}
    for number, request in enumerate(requests, 1):
        alike = _alike(request)
        if alike in planned:
            found.append(dataclasses.replace(planned[alike], request=request))
            continue
        try:
            planned[alike] = outline(coordinator, request)
            found.append(planned[alike])
        except ConfigError:
            raise
        except MayflyError as exc:
            which = f"request {number} of {len(requests)}" if len(requests) > 1 else "request"
            raise PreflightError(f"{which} ({request.task}): {exc}", exc) from exc
    return found


def _alike(request: TaskRequest) -> str:
    """What requests alike but for their ids share (``--count N`` makes N): the
    checks and the plan of one hold for all."""
    return request.model_dump_json(
        include={"task", "version", "channel", "params", "devices", "selector", "rollout"}
    )
