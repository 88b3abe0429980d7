"""The result archive: every complete result and rejection, for ``mayfly report``.

A port with two implementations, as for the package store:

- :class:`LocalResultArchive` (embedded default, ``$MAYFLY_HOME/archive/``):
  one JSON-lines file per UTC day, ``YYYY-MM-DD.jsonl``, appended and fsynced;
- :class:`BucketResultArchive` (S3, or any bucket-shaped
  :class:`~mayfly.packages.PackageStore`): one object per request,
  ``archive/YYYY-MM-DD/<request id>.json`` (``.rejected.json`` for a
  rejection).

Each record is the event as a structured-mode CloudEvent
(``application/cloudevents+json``): the attributes plus ``data``, exactly what
a Kafka or HTTP consumer would read, so an archived result can be decoded,
replayed or inspected with the event contract's own tools. The day is the UTC
date of :func:`event_time`: the request's finish, or a rejection's time.

Readers are tolerant: a line or object that does not decode (a write torn by
a crash) is skipped with a warning; redelivered duplicates come out once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from mayfly.errors import EventError, StoreError
from mayfly.events import TASK_COMPLETED, TASK_REJECTED, TaskCompleted, TaskRejected

if TYPE_CHECKING:  # the package store's code (signing, manifests) is not the aggregator's
    from mayfly.packages import PackageStore

__all__ = [
    "ArchivedEvent",
    "BucketResultArchive",
    "LocalResultArchive",
    "ResultArchive",
    "archive_key",
    "decode_archived",
    "dedupe_key",
    "encode_archived",
    "event_time",
]

#: Where results are archived: a folder, or ``s3://BUCKET[/PREFIX]``.
#: Default ``$MAYFLY_HOME/archive``.

ArchivedEvent: TypeAlias = TaskCompleted | TaskRejected

_LOG = logging.getLogger("mayfly.aggregator.archive")
_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Beyond this many days one listing of the whole archive is cheaper.
_MAX_DAYS_LISTED = 31
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_MODELS: Mapping[str, type[TaskCompleted] | type[TaskRejected]] = {
    TASK_COMPLETED: TaskCompleted,
    TASK_REJECTED: TaskRejected,
}


def event_time(event: ArchivedEvent) -> datetime:
    """The moment an archived event is filed and sorted under.

    A result's finish time, a rejection's event time: both when the request
    ended.
    """
    if isinstance(event, TaskCompleted):
        return event.timings.finished_at
    return event.time


def dedupe_key(event: ArchivedEvent) -> str:
    """Identity of an archived event: a redelivery has the same key, a request
    of another source with the same id another one."""
    if isinstance(event, TaskCompleted):  # a shard's: its request's, which it is part of
        return f"completed:{event.request_source or ''}\x1f{event.root_id}"
    return f"rejected:{event.original.get('source', '')}\x1f{event.id}"


def encode_archived(event: ArchivedEvent) -> bytes:
    """The event as one line of structured-mode CloudEvent JSON (no newline).

    Unlike the Kafka encoding there is no size limit: a merged result of a
    large fan-out is archived whole.
    """
    envelope = json.dumps(event.cloudevent_attributes(), separators=(",", ":")).encode()
    return envelope[:-1] + b',"data":' + event.data_json() + b"}"


def decode_archived(raw: bytes | str) -> ArchivedEvent:
    """Decode what :func:`encode_archived` wrote.

    Raises:
        EventError: when it is not an archived Mayfly result or rejection.
    """
    try:
        envelope = json.loads(raw)
    except ValueError as exc:
        raise EventError("data", f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise EventError("data", "an archived event is a JSON object")
    data = envelope.pop("data", None)
    model = _MODELS.get(str(envelope.get("type")))
    if model is None:
        raise EventError("type", f"{envelope.get('type')!r} is not an archived event type")
    if not isinstance(data, dict):
        raise EventError("data", "must be a JSON object")
    return model.from_parts(envelope, data)


def _in_range(
    event: ArchivedEvent, since: datetime | None, until: datetime | None, task: str | None
) -> bool:
    if task is not None and event.task != task:
        return False
    moment = event_time(event)
    return (since is None or moment >= since) and (until is None or moment < until)


def _day_in_range(day: date, since: datetime | None, until: datetime | None) -> bool:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return (since is None or start + timedelta(days=1) > since) and (until is None or start < until)


def _ordered(
    events: Iterable[ArchivedEvent],
    since: datetime | None,
    until: datetime | None,
    task: str | None,
) -> list[ArchivedEvent]:
    """One day's events: filtered, the first of each duplicate kept, in time order."""
    seen: set[str] = set()
    kept: list[ArchivedEvent] = []
    for event in events:
        key = dedupe_key(event)
        if key in seen:
            continue
        seen.add(key)
        if _in_range(event, since, until, task):
            kept.append(event)
    kept.sort(key=event_time)
    return kept


@runtime_checkable
class ResultArchive(Protocol):
    """Where complete results and rejections are kept for reports."""

    def describe(self) -> str:
        """Where the archive is, for messages."""
        ...

    def append(self, events: Sequence[ArchivedEvent]) -> None:
        """Archive events durably; when this returns they survive a crash.

        Raises:
            StoreError: when they could not be written.
        """
        ...

    def read(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        task: str | None = None,
    ) -> Iterator[ArchivedEvent]:
        """Archived events in time order (:func:`event_time`), each once.

        Args:
            since: only events at or after this moment.
            until: only events before this moment.
            task: only events of this task type.
        """
        ...


class LocalResultArchive:
    """A folder of ``YYYY-MM-DD.jsonl`` files (UTC days), appended and fsynced.

    One ``append`` call is one write and one fsync per day file touched, so a
    caller that archives a batch pays for durability once.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def append(self, events: Sequence[ArchivedEvent]) -> None:
        by_day: dict[date, list[bytes]] = defaultdict(list)
        for event in events:
            by_day[event_time(event).date()].append(encode_archived(event) + b"\n")
        if not by_day:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for day, lines in by_day.items():
                self._append(self.root / f"{day.isoformat()}.jsonl", b"".join(lines))
        except OSError as exc:
            raise StoreError(f"cannot archive results in {self.root}: {exc}") from exc

    def _append(self, path: Path, payload: bytes) -> None:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            # A crash mid-write leaves a line without its newline; start on a
            # fresh line so the torn one stays alone and the reader skips it.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                payload = b"\n" + payload
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            # Make the new file's directory entry durable too.
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def days(self) -> list[date]:
        """The days that have a file, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot read the archive {self.root}: {exc}") from exc
        found = []
        for name in names:
            match = _DAY_FILE.match(name)
            if match:
                try:
                    found.append(date.fromisoformat(match[1]))
                except ValueError:
                    continue
        return sorted(found)

    def read(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        task: str | None = None,
    ) -> Iterator[ArchivedEvent]:
        for day in self.days():
            if _day_in_range(day, since, until):
                yield from _ordered(self._read_day(day), since, until, task)

    def _read_day(self, day: date) -> Iterator[ArchivedEvent]:
        path = self.root / f"{day.isoformat()}.jsonl"
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        lines = content.split(b"\n")
        # The last line, unless empty, has no newline yet: a record being written
        # now (or a write cut short); it is read once it is whole.
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                yield decode_archived(line)
            except EventError as exc:
                _LOG.warning("%s:%d: skipped an unreadable record (%s)", path, number, exc)


def archive_key(event: ArchivedEvent, prefix: str = "archive") -> str:
    """The object key of an event in a bucket archive.

    Request ids are visible ASCII and may hold ``/`` or ``%``; one that is
    not a plain file name is replaced by its sha256, the object keeping the id.
    """
    ident = event.request_id if event.request_id is not None else event.id
    name = (
        ident if _PLAIN_ID.match(ident) else "sha256-" + hashlib.sha256(ident.encode()).hexdigest()
    )
    suffix = ".json" if isinstance(event, TaskCompleted) else ".rejected.json"
    day = event_time(event).date().isoformat()
    return f"{prefix}/{day}/{name}{suffix}" if prefix else f"{day}/{name}{suffix}"


class BucketResultArchive:
    """One object per request under ``<prefix>/YYYY-MM-DD/`` in a bucket-shaped store.

    Backed by :class:`~mayfly.packages.s3store.S3PackageStore` for S3 (its
    connection handling, timeouts and error translation); any
    :class:`~mayfly.packages.PackageStore` works. A redelivered result
    overwrites its own object, so the archive holds each request once.

    Args:
        store: the bucket.
        prefix: key prefix of the archive (no leading or trailing ``/``).
        read_workers: objects fetched in parallel when reading.
    """

    def __init__(self, store: PackageStore, prefix: str = "archive", *, read_workers: int = 8):
        self.store = store
        self.prefix = prefix.strip("/")
        self.read_workers = read_workers

    def describe(self) -> str:
        return f"{self.store.describe()}/{self.prefix}" if self.prefix else self.store.describe()

    def append(self, events: Sequence[ArchivedEvent]) -> None:
        for event in events:
            self.store.put(archive_key(event, self.prefix), encode_archived(event))

    def _day_keys(self, since: datetime | None, until: datetime | None) -> dict[date, list[str]]:
        base = f"{self.prefix}/" if self.prefix else ""
        end = (until or datetime.now(UTC) + timedelta(days=1)).date()
        if since is not None and (end - since.date()).days <= _MAX_DAYS_LISTED:
            # Listing day by day avoids walking the whole archive for a recent window.
            day, listings = since.date(), []
            while day <= end:
                listings.extend(self.store.list_keys(f"{base}{day.isoformat()}/"))
                day += timedelta(days=1)
        else:
            listings = self.store.list_keys(base)
        by_day: dict[date, list[str]] = defaultdict(list)
        for key in listings:
            folder, _, name = key[len(base) :].partition("/")
            if not _DAY.match(folder) or "/" in name or not name.endswith(".json"):
                continue
            try:
                day_of = date.fromisoformat(folder)
            except ValueError:
                continue
            if _day_in_range(day_of, since, until):
                by_day[day_of].append(key)
        return by_day

    def read(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        task: str | None = None,
    ) -> Iterator[ArchivedEvent]:
        by_day = self._day_keys(since, until)
        with ThreadPoolExecutor(max_workers=self.read_workers) as pool:
            for day in sorted(by_day):
                keys = sorted(by_day[day])
                blobs = pool.map(self.store.get, keys)
                yield from _ordered(self._decode_all(blobs, keys), since, until, task)

    def _decode_all(
        self, blobs: Iterable[bytes | None], keys: Sequence[str]
    ) -> Iterator[ArchivedEvent]:
        for key, blob in zip(keys, blobs, strict=True):
            if blob is None:
                continue  # deleted between listing and reading
            try:
                yield decode_archived(blob)
            except EventError as exc:
                _LOG.warning("%s: skipped an unreadable object (%s)", key, exc)
