"""The event log port: Kafka-shaped topics, records and consumer groups.

Two implementations stand behind it: the embedded SQLite log (the default on
one machine, no server) and Kafka. Records carry Kafka's binary-mode
CloudEvents as they are (key, headers, value), so every component decodes
them the same way whichever log is underneath.

Semantics both implementations keep (and the contract tests check):

- ``append`` returns only once the record is durable;
- within a partition, offsets are dense and increasing from 0, and records
  come back in append order;
- a consumer belongs to a group and reads one topic; a new consumer of a
  group starts at the group's committed offset (0 if none), so records after
  the last commit are delivered again after a crash;
- ``commit`` stores, per partition, the offset of the next record to read;
- a :class:`MultiTopicConsumer` reads several topics as one reader (one
  Kafka consumer, one wait for a record of any of them), with each topic's
  offsets its own, as if one :class:`LogConsumer` of the group read it;
- a :class:`GroupMember` reads several topics *sharing* them with the other
  members of its group (other runtimes on one Kafka): each partition belongs
  to one member at a time, and a :class:`Rebalance` is told when partitions
  come and go, so a member gives a partition up only once what it started
  there is done, and commits its :class:`Position` as it goes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mayfly.positions import Position

__all__ = [
    "WRITE_SETTLE_S",
    "EventLog",
    "GroupMember",
    "Headers",
    "LogConsumer",
    "LogRecord",
    "MultiTopicConsumer",
    "Position",
    "Rebalance",
    "Waker",
    "check_record",
]

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class LogRecord:
    """One record, shaped like a Kafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0


class LogConsumer(Protocol):
    """Reads one topic for one consumer group."""

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Records after the ones already returned, waiting up to ``timeout_s`` for some."""
        ...

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Durably store, per partition, the offset of the next record to read."""
        ...

    def committed(self) -> dict[int, int]:
        """The group's committed offsets, per partition."""
        ...

    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset the next appended record will get."""
        ...

    def close(self) -> None: ...


class MultiTopicConsumer(Protocol):
    """Reads several topics for one consumer group, as one reader.

    For a reader of several topics that would otherwise poll each in turn: one
    ``poll`` waits for a record of any of them (on Kafka, in one fetch the
    broker holds). Each topic keeps its own committed offsets, the ones a
    :class:`LogConsumer` of the same group and topic reads and writes.
    """

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Records of any topic not paused, after the ones already returned (in
        order within each partition), waiting up to ``timeout_s`` for some."""
        ...

    def pause(self, topic: str) -> None:
        """Return no more records of ``topic`` until :meth:`resume`; none is skipped."""
        ...

    def resume(self, topic: str) -> None: ...

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Durably store, per topic and partition, the offset of the next record to read."""
        ...

    def committed(self) -> dict[str, dict[int, int]]:
        """Per topic (every one, ``{}`` if never committed), the group's committed
        offsets per partition."""
        ...

    def close(self) -> None: ...


class Rebalance(Protocol):
    """What a :class:`GroupMember`'s owner is told as partitions move.

    Called from inside the member's ``poll`` (so never while the owner is
    doing anything else), in this order for partitions that leave: ``revoking``
    once, ``drain`` until it returns True (or the member's bound runs out),
    then ``positions``, which the member commits before another member may
    read those partitions.
    """

    def assigned(self, topic: str, positions: Mapping[int, Position]) -> None:
        """These partitions of ``topic`` are this member's now, starting at ``positions``."""
        ...

    def revoking(self, topic: str, partitions: Collection[int]) -> None:
        """These partitions go to another member: start nothing more of them."""
        ...

    def drain(self, wait_s: float) -> bool:
        """Finish, for up to ``wait_s``, what was started of revoking partitions;
        True once nothing is."""
        ...

    def positions(self) -> Mapping[str, Mapping[int, Position]]:
        """Where each revoking partition stands, to commit; they are forgotten."""
        ...

    def lost(self, topic: str, partitions: Collection[int]) -> None:
        """These partitions were taken without a revoke (this member was
        thought dead): nothing of them can be committed any more."""
        ...


def check_record(key: object, value: object) -> None:
    """Refuse a record's key or value of the wrong type before any is appended.

    Raises:
        TypeError: naming the type found.
    """
    if key is not None and not isinstance(key, bytes):
        raise TypeError(f"key must be bytes or None, not {type(key).__name__}")
    if not isinstance(value, bytes):
        raise TypeError(f"value must be bytes, not {type(value).__name__}")


#: How long a reader woken by a :class:`Waker` keeps looking before it sleeps
#: again: a wake can come before the write is visible (SQLite writes its WAL
#: frames, the event, before it publishes the commit in shared memory, which
#: makes none).
WRITE_SETTLE_S = 0.05


class GroupMember(MultiTopicConsumer, Protocol):
    """A :class:`MultiTopicConsumer` sharing its topics with the other members
    of its group (``shared``), or alone with them (the embedded log, which one
    runtime serves at a time)."""

    @property
    def shared(self) -> bool:
        """Whether other members may take partitions from this one."""
        ...

    def commit_positions(self, positions: Mapping[str, Mapping[int, Position]]) -> None:
        """Durably store, per topic and partition, where the group stands
        (a log whose groups have one member may keep only the offsets)."""
        ...


class Waker(Protocol):
    """A descriptor that becomes readable after a write to the log."""

    def fileno(self) -> int: ...

    def drain(self) -> bool:
        """Consume what is pending; whether it may mean new records. Call it
        before reading the log, so that a write after the read still wakes."""
        ...

    def close(self) -> None: ...


class EventLog(Protocol):
    """Topics of records: append, and read through consumer groups."""

    def append(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        """Add a record; return once it is durable."""
        ...

    def append_many(self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]) -> None:
        """Add records ``(topic, key, value, headers)`` in order; return once every
        one is durable (on a failure some may be, and may be appended again: the
        readers dedupe). One commit or one round of acknowledgements for all."""
        ...

    def consumer(self, group: str, topic: str) -> LogConsumer:
        """A consumer of ``topic`` in ``group``, starting at the committed offsets."""
        ...

    def consumer_of(self, group: str, topics: Sequence[str]) -> MultiTopicConsumer:
        """One consumer of all of ``topics`` in ``group``, each at its committed offsets."""
        ...

    def member_of(
        self, group: str, topics: Sequence[str], rebalance: Rebalance | None = None
    ) -> GroupMember:
        """A member of ``group`` reading ``topics``, each partition of which it
        shares with the group's other members; ``rebalance`` is told of the
        partitions it gets and gives up.

        Raises:
            EventLogError: on a log that allows one member per group, when
                another process has one.
        """
        ...

    def read_key(
        self, topic: str, key: bytes, since_ms: int, limit: int = 100_000
    ) -> list[LogRecord]:
        """The records of ``topic`` with ``key`` appended at ``since_ms`` (ms since
        the epoch) or later, oldest first, up to where the topic ended when asked
        and at most ``limit``; no group is involved and nothing is committed.

        For reading back one request's reports (they share its key): Kafka
        reads only the key's partition, from the offset of ``since_ms``.

        Raises:
            EventLogError: the log cannot be read.
        """
        ...

    def assume_topics(self, topics: Iterable[str]) -> None:
        """Take ``topics`` as existing, so appends to them skip any check.

        For a process whose topics another process of the installation made
        (a coordinator forked by the runtime, whose dispatcher made them all).
        """
        ...

    def describe(self) -> str:
        """Where the log is, for messages."""
        ...

    def waker(self) -> Waker | None:
        """Something to ``select`` on that becomes readable after records may have
        been appended (the caller closes it); None when the log has no such thing
        and readers poll."""
        ...

    def close(self) -> None: ...
