"""The one exception tree of Mayfly.

Every error Mayfly raises on purpose derives from :class:`MayflyError`, so a
caller (the CLI, a function entry point) can catch one type and turn it into a
readable message or a ``task.rejected`` event::

    MayflyError
    ├── ConfigError                 bad settings or environment
    │   └── UnusableFileError       a state file that is foreign, garbage or corrupt
    ├── EventError                  a CloudEvent that breaks the contract
    ├── PackageError                anything about a task package
    │   ├── ManifestError           manifest missing or invalid
    │   ├── UnsafeArchiveError      archive that would escape or explode
    │   ├── IntegrityError          digest or signature does not match
    │   ├── SigningKeyError         signing key missing or unreadable
    │   ├── PackageNotFoundError    no such package, version or channel
    │   └── ImmutableVersionError   version exists with other bytes
    ├── StoreError                  the package store backend failed
    ├── InventoryError              device inventory missing or invalid
    │   └── UnknownDeviceError      a request names devices not in it
    ├── ParamsError                 request params fail the package schema
    ├── SinkError                   a result could not be made durable
    ├── EventLogError               the event log cannot append, read or commit
    │   ├── EventLogFileError       its SQLite file is unusable (an UnusableFileError too)
    │   └── GroupBusyError          another runtime serves that embedded log
    ├── CoordinatorCrashedError     a request kept crashing its coordinator
    ├── RequestCanceledError        a request canceled before it started
    ├── RuntimeStartError           the local runtime's warm parent could not start
    ├── DeployError                 Kubernetes refused or could not take a resource
    └── DeviceError                 talking to one device failed
        ├── DeviceUnavailableError  unreachable, timing out, 5xx or 429 after retries
        └── DeviceActionError       the device refused the action (4xx, bad answer)

Each subclass says when it is raised and carries the fields a message or a
rejection needs (``package``, ``version``, ``field``...).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ConfigError",
    "CoordinatorCrashedError",
    "DeployError",
    "DeviceActionError",
    "DeviceError",
    "DeviceUnavailableError",
    "EventError",
    "EventLogError",
    "EventLogFileError",
    "GroupBusyError",
    "ImmutableVersionError",
    "IntegrityError",
    "InventoryError",
    "ManifestError",
    "MayflyError",
    "PackageError",
    "PackageNotFoundError",
    "ParamsError",
    "PreflightError",
    "RequestCanceledError",
    "RuntimeStartError",
    "SigningKeyError",
    "SinkError",
    "StoreError",
    "UnknownDeviceError",
    "UnsafeArchiveError",
    "UnusableFileError",
]


class MayflyError(Exception):
    """Base of every error Mayfly raises on purpose."""


class ConfigError(MayflyError):
    """Raised when settings or environment variables are missing or invalid."""


class PreflightError(MayflyError):
    """Raised by ``mayfly publish`` for a request its coordinator would reject:
    nothing was published.

    Attributes:
        kind: the class name of the error the check met (``PackageNotFoundError``...).
        cause: that error.
    """

    def __init__(self, message: str, cause: MayflyError) -> None:
        self.kind = type(cause).__name__
        self.cause = cause
        super().__init__(message)


class UnusableFileError(ConfigError):
    """Raised when a file Mayfly keeps its own state in (the SQLite event log, the
    runtime's state) cannot be used: its folder cannot be created or written, it
    is not a SQLite database, it is another application's database, its schema is
    one this Mayfly does not read, or it is corrupt.

    A configuration error (exit 2): nothing runs until the file is moved aside
    or Mayfly is pointed at another one, and a foreign file is left untouched.

    Attributes:
        path: the file.
        reason: what is wrong with it, and what to do.
    """

    def __init__(self, path: Path, reason: str, *, label: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{label}{path}: {reason}")


class EventError(MayflyError):
    """Raised when a CloudEvent breaks the event contract.

    Attributes:
        field: the attribute or data field at fault (``"priority"``,
            ``"data.devices"``...), so the message and any rejection name it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class PackageError(MayflyError):
    """Raised when a task package cannot be built, stored, fetched or trusted.

    Attributes:
        package: the package name, when known.
        version: the package version, when known.
    """

    def __init__(
        self, message: str, *, package: str | None = None, version: str | None = None
    ) -> None:
        self.package = package
        self.version = version
        self.reason = message
        where = package or ""
        if version:
            where = f"{where} {version}".strip()
        super().__init__(f"{where}: {message}" if where else message)


class ManifestError(PackageError):
    """Raised when a package manifest is missing, unparsable or invalid."""


class UnsafeArchiveError(PackageError):
    """Raised when an archive holds a member that is not a plain file or folder (a
    link, a device), has an unsafe name or path, collides with another member,
    or exceeds the size or file-count limits.

    Attributes:
        member: the offending member's name as the archive spells it, when one is
            at fault (not for a corrupt or oversized stream).
    """

    def __init__(
        self,
        message: str,
        *,
        member: str | None = None,
        package: str | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(message, package=package, version=version)
        self.member = member


class IntegrityError(PackageError):
    """Raised when a package's digest or signature does not verify."""


class SigningKeyError(PackageError):
    """Raised when a signing or trusted public key is missing or unreadable."""


class PackageNotFoundError(PackageError):
    """Raised when a package, version or channel does not exist in the store."""


class ImmutableVersionError(PackageError):
    """Raised when publishing a version that already exists with other bytes."""


class StoreError(MayflyError):
    """Raised when a package store backend (folder or S3) fails."""


class InventoryError(MayflyError):
    """Raised when a device inventory cannot be read or is invalid."""


class UnknownDeviceError(InventoryError):
    """Raised when a request names device ids that the inventory does not hold.

    Attributes:
        device_ids: every unknown id, so one message lists them all.
    """

    def __init__(self, device_ids: list[str]) -> None:
        self.device_ids = tuple(device_ids)
        shown = ", ".join(device_ids[:10]) + (" ..." if len(device_ids) > 10 else "")
        super().__init__(f"unknown device(s) ({len(device_ids)}): {shown}")


class ParamsError(MayflyError):
    """Raised when request params do not satisfy the package's params schema.

    Attributes:
        field: dotted path of the offending param (``params.config.log_level``).
    """

    def __init__(self, field: str, message: str, *, package: str | None = None) -> None:
        self.field = field
        self.package = package
        self.reason = message
        super().__init__(f"{field}: {message}")


class DeviceError(MayflyError):
    """Raised when an operation on one device fails.

    Attributes:
        device_id: the device.
    """

    def __init__(self, device_id: str, message: str) -> None:
        self.device_id = device_id
        self.reason = message
        super().__init__(f"device {device_id}: {message}")


class DeviceUnavailableError(DeviceError):
    """Raised when a device cannot be reached, times out, or answers 5xx or 429
    after the driver's retries."""


class DeviceActionError(DeviceError):
    """Raised when a device refuses an action (4xx) or answers something that is
    not the JSON object the protocol promises."""


class SinkError(MayflyError):
    """Raised when a result sink (file, HTTP, Kafka) does not take an event durably."""


class CoordinatorCrashedError(MayflyError):
    """Raised (as a rejection's cause) when a request's coordinator process kept
    dying without a result, so the request goes to the dead-letter topic."""


class RequestCanceledError(MayflyError):
    """Raised (as a rejection's cause, code ``canceled``) for a request canceled
    (``mayfly cancel``) before it started: it never will."""


class RuntimeStartError(MayflyError):
    """Raised when the local runtime's warm parent cannot build what coordinators
    need (an unreachable store, an unreadable key folder); the message says why."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        """The class name of the error the warm parent met (``StoreError``...),
        so the command line gives the same hint as for that error."""


class EventLogError(MayflyError):
    """Raised when the event log (SQLite or Kafka) cannot append, read or commit."""


class GroupBusyError(EventLogError):
    """Raised when a consumer group of the embedded event log already has its one
    member in another process (another runtime serves that log)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid
        """The process holding the group, if it said."""


class EventLogFileError(UnusableFileError, EventLogError):
    """Raised when the SQLite event log's file cannot be used (see
    :class:`UnusableFileError`); an :class:`EventLogError` too, so whoever catches
    the log's errors still does. The message starts ``sqlite:PATH:``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason, label="sqlite:")


class DeployError(MayflyError):
    """Raised when Knative resources cannot be rendered or the Kubernetes API refuses
    one; the message names the object (kind namespace/name) and the offending field."""
