"""The event log on Apache Kafka: the same port as the embedded SQLite log.

- **Durable appends.** One idempotent producer per process, ``acks="all"``;
  ``append`` waits for the acknowledgement. Idempotence makes retries safe (no
  duplicates, order kept), so transient errors are retried for up to 30 s: a
  broker paused or restarting for a few seconds delays appends, not fails them.
- **Topics are created, never auto-created.** The first use of a topic creates
  it (``partitions`` partitions, replication factor 1) with every topic of its
  Mayfly installation (lanes, results, dead letters under one prefix), so a
  forked coordinator finds its results topic known and needs no admin client.
  Clients do not auto-create: a typo cannot make a topic with broker defaults.
- **Consumers assign; members subscribe.** A consumer takes every partition
  of its topic (or topics, :meth:`KafkaEventLog.consumer_of`) with ``assign()``,
  at the group's committed offsets (else the beginning), and commits to the
  group: no join, no rebalance, every partition its own. A *member*
  (:meth:`KafkaEventLog.member_of`: the dispatcher and the aggregator of each
  runtime) joins the group instead, with cooperative rebalancing (KIP-429), so
  several runtimes split the partitions and a partition that moves stops only
  itself. A partition leaves a member only after its :class:`Rebalance` has
  drained what it started there and the member committed its
  :class:`~mayfly.eventlog.Position` (offset, and in the commit's metadata the
  records after it already done), which the next member reads back.
- **Fork safety.** The runtime forks coordinators that append their results.
  Clients are per process: a child makes its own and never closes (nor lets
  the garbage collector close) an inherited one, which shares the parent's
  sockets: kafka-python shuts sockets down on close.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
    for_code,
)
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata, TopicPartition

from mayfly.errors import EventLogError
from mayfly.eventlog import (
    GroupMember,
    Headers,
    LogConsumer,
    LogRecord,
    MultiTopicConsumer,
    Position,
    Rebalance,
    check_record,
)
from mayfly.topics import installation_of

__all__ = ["KafkaEventLog"]

_LOG = logging.getLogger("mayfly.eventlog.kafka")

# A request to a paused broker is answered when it resumes: waiting 10 s for it
# rides out a pause of a few seconds without a reconnect.
_REQUEST_TIMEOUT_MS = 10_000
# How long send() may wait for topic metadata before it even queues a record.
_MAX_BLOCK_MS = 10_000
# Upper bound on one append, retries included (must exceed the request timeout).
_DELIVERY_TIMEOUT_MS = 30_000
# Commits, committed offsets, end offsets and topic creation retry this long.
_OPERATION_TIMEOUT_MS = 30_000
_CLOSE_TIMEOUT_S = 5.0
# How long the broker holds an idle fetch of a multi-topic consumer (kafka-python:
# 500 ms). A record ends the fetch at once (fetch_min_bytes 1), so this is only
# how often an idle reader is answered: each answer costs the client CPU, and the
# dispatcher's idle consumer went from 0.7 % to 0.5 % of a core with 2 s. It also
# bounds how long a resumed topic waits for the fetch in flight to end, which
# took only the other topics' partitions.
_MULTI_FETCH_MAX_WAIT_MS = 2_000
# Least time between two metadata requests of a new producer (kafka-python: 100 ms).
_METADATA_BACKOFF_MS = 5
# A member is thought dead this long after its last heartbeat, and its partitions
# go to the others (kafka-python: 45 s; the broker's least is 6 s).
_SESSION_TIMEOUT_MS = 10_000
# How long a member leaving a partition waits for what it started there to end
# before it lets the partition go anyway (the rest may then run twice).
_DRAIN_S = 30.0
# A revoking member's owner is given this long per turn, between heartbeats.
_DRAIN_TURN_S = 0.05
# Pending offsets kept in one commit's metadata (the broker takes 4 KiB).
_MAX_PENDING_NOTED = 200
_POSITION_MARK = "mayfly/1"
# kafka-python 3.0.12: a member polled again and again with a timeout of 0 while
# records flow sends no heartbeat (seen: none for 13 s, so the group gave its
# partitions to another member and this one was never told). 1 ms is enough.
_MEMBER_LEAST_POLL_S = 0.001
# The longest one poll waits for a join to end (every member must rejoin, and
# one may be draining what it gives up); past it, the next poll waits again.
_JOIN_WAIT_MS = 60_000
# Clients inherited through fork(): referenced forever, never closed (see module doc).
_INHERITED: list[object] = []


class KafkaEventLog:
    """The :class:`~mayfly.eventlog.EventLog` on a Kafka cluster.

    Safe to share between threads, and to use on both sides of a ``fork()``
    (except consumers: they belong to the process that made them).

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        partitions: partitions of every topic this log creates.
        client_id: the client id brokers see, in their logs and quotas.
        connect_timeout_s: how long making a client waits for a broker to
            accept and answer before the operation raises :class:`EventLogError`.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        partitions: int = 3,
        client_id: str = "mayfly",
        connect_timeout_s: float = 10.0,
    ) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        self._bootstrap, self._partitions, self._id = bootstrap, partitions, client_id
        self._servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
        self._connect_timeout_s = connect_timeout_s
        self._topics: set[str] = set()  # known to exist; still true in a forked child
        self._pid, self._lock = os.getpid(), threading.Lock()
        self._producer: Any = None
        self._admin: Any = None
        self._consumers: weakref.WeakSet[_KafkaReader] = weakref.WeakSet()
        self._closed = False

    def append(self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()) -> None:
        """Add a record to ``topic`` (its partition chosen by ``key``); return once all
        in-sync replicas have it.

        Raises:
            EventLogError: no broker answered, or the record was refused or not
                acknowledged within 30 s.
        """
        self.append_many([(topic, key, value, headers)])

    def append_many(self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]) -> None:
        """Send every record, then wait for all of their acknowledgements: the
        producer batches what is in flight together, one round trip for many.

        Raises:
            EventLogError: as :meth:`append`, for the first record refused.
        """
        checked = []
        for topic, key, value, headers in records:
            check_record(key, value)
            pairs = list(headers)
            for name, data in pairs:
                if not isinstance(name, str) or not isinstance(data, bytes):
                    raise TypeError(f"a header is a (str, bytes) pair, not ({name!r}, {data!r})")
            self._ensure_topic(topic)
            checked.append((topic, key, value, pairs))
        if not checked:
            return
        topics = ", ".join(sorted({t for t, _, _, _ in checked}))
        with self._translated(f"record to {topics} not acknowledged"):
            producer = self._client("producer")
            futures = [producer.send(t, key=k, value=v, headers=h) for t, k, v, h in checked]
            for future in futures:
                future.get(timeout=_DELIVERY_TIMEOUT_MS / 1000 + 5)  # the producer times out first

    def consumer(self, group: str, topic: str) -> LogConsumer:
        """A consumer of every partition of ``topic``, at ``group``'s committed offsets."""
        self._ensure_topic(topic)
        consumer = _KafkaConsumer(self, group, topic)
        self._consumers.add(consumer)
        return consumer

    def consumer_of(self, group: str, topics: Sequence[str]) -> MultiTopicConsumer:
        """One consumer of every partition of each of ``topics``, at ``group``'s committed
        offsets: one client, one fetch in flight for them all."""
        if not topics or len(set(topics)) != len(topics):
            raise ValueError(f"topics must be distinct and at least one, not {list(topics)}")
        for topic in topics:
            self._ensure_topic(topic)
        consumer = _KafkaMultiConsumer(self, group, topics)
        self._consumers.add(consumer)
        return consumer

    def member_of(
        self, group: str, topics: Sequence[str], rebalance: Rebalance | None = None
    ) -> GroupMember:
        """A member of ``group`` reading ``topics``: it joins the group, gets a share
        of the partitions (cooperative-sticky), and tells ``rebalance`` as they move."""
        if not topics or len(set(topics)) != len(topics):
            raise ValueError(f"topics must be distinct and at least one, not {list(topics)}")
        for topic in topics:
            self._ensure_topic(topic)
        member = _KafkaMember(self, group, topics, rebalance)
        self._consumers.add(member)
        return member

    def read_key(
        self, topic: str, key: bytes, since_ms: int, limit: int = 100_000
    ) -> list[LogRecord]:
        """The records of ``topic`` with ``key`` appended at ``since_ms`` or later:
        the key's partition (the producer's own partitioner picks it) read
        from the offset of ``since_ms`` to the end it had when asked."""
        self._ensure_topic(topic)
        consumer = self._open(
            KafkaConsumer,
            client_id=self._id,
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            metrics_enabled=False,
        )
        found: list[LogRecord] = []
        try:
            with self._translated(f"cannot read {topic}"):
                partitions = sorted(consumer.partitions_for_topic(topic) or ())
                if not partitions:
                    raise EventLogError(f"{self.describe()}: topic {topic} has no partitions")
                # As the producer's default partitioner places a keyed record.
                tp = TopicPartition(
                    topic, partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
                )
                consumer.assign([tp])
                end = consumer.end_offsets([tp], timeout_ms=_OPERATION_TIMEOUT_MS)[tp]
                at = consumer.offsets_for_times({tp: since_ms}, timeout_ms=_OPERATION_TIMEOUT_MS)
                start = at[tp].offset if at.get(tp) is not None else end
                consumer.seek(tp, start)
                deadline = time.monotonic() + _OPERATION_TIMEOUT_MS / 1000
                while consumer.position(tp) < end and len(found) < limit:
                    if time.monotonic() > deadline:
                        raise EventLogError(f"{self.describe()}: reading {topic} timed out")
                    for batch in consumer.poll(timeout_ms=500, max_records=2000).values():
                        for r in batch:
                            if r.offset < end and r.key == key and len(found) < limit:
                                found.append(_to_record(r))
        finally:
            consumer.close(autocommit=False)
        return found

    def assume_topics(self, topics: Iterable[str]) -> None:
        """Take ``topics`` as existing, without asking: appends to them skip the check.

        For a process whose topics another process of the installation made:
        the runtime's dispatcher creates every topic before it reads the request
        a coordinator runs, so a forked coordinator need not make an admin
        client to check (that was half its CPU on Kafka, bench/pipeline.py). A
        topic assumed wrongly fails its appends after ``max_block_ms``.
        """
        self._topics.update(topics)

    def describe(self) -> str:
        return f"kafka://{self._bootstrap}"

    def waker(self) -> None:
        """None: a Kafka reader waits in its own poll (a fetch the broker holds)."""
        return None

    def close(self) -> None:
        """Close the clients this process made: consumers, producer (after a flush), admin."""
        for consumer in list(self._consumers):
            consumer.close()
        self._forget_inherited()
        with self._lock:
            self._closed = True
            if self._producer is not None:
                self._producer.close(timeout=_CLOSE_TIMEOUT_S)
            if self._admin is not None:
                self._admin.close()
            self._producer = self._admin = None

    def __enter__(self) -> KafkaEventLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Turn kafka-python's errors into an EventLogError that says where and what."""
        try:
            yield
        except KafkaError as exc:
            raise EventLogError(f"{self.describe()}: {what}: {type(exc).__name__}: {exc}") from exc

    def _open(self, cls: Any, **configs: Any) -> Any:
        """A new kafka-python client, or EventLogError when no broker answers in time.

        kafka-python 3.0.12 leaks the socket of every refused connection, and a
        client whose constructor times out keeps its I/O thread running: so wait
        for a server to accept TCP first (which also rides out a broker restart),
        and close what a failed constructor leaves behind.
        """
        deadline = time.monotonic() + self._connect_timeout_s
        while not self._accepts_connections():
            if time.monotonic() >= deadline:
                raise EventLogError(f"{self.describe()}: no broker accepts connections")
            time.sleep(0.1)
        client = cls.__new__(cls)
        with self._translated("no broker answered"):  # KafkaTimeoutError
            try:
                client.__init__(
                    bootstrap_servers=self._servers,
                    request_timeout_ms=_REQUEST_TIMEOUT_MS,
                    bootstrap_timeout_ms=int(self._connect_timeout_s * 1000),
                    **configs,
                )
            except BaseException:
                if getattr(client, "_client", None) is not None:
                    client._client.close()
                raise
        return client

    def _accepts_connections(self) -> bool:
        for server in self._servers:
            host, _, port = server.rpartition(":") if ":" in server else (server, "", "9092")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            except (OSError, ValueError):
                continue
            return True
        return False

    def _forget_inherited(self) -> None:
        """After a fork, set aside (never close) the parent's clients, and its lock, which
        may have been copied held by a thread that is not here."""
        if self._pid != os.getpid():
            _INHERITED.extend(c for c in (self._producer, self._admin) if c is not None)
            self._producer = self._admin = None
            self._pid, self._lock = os.getpid(), threading.Lock()

    def _client(self, kind: str) -> Any:
        """This process's producer or admin client, made on first use."""
        self._forget_inherited()
        with self._lock:
            if self._closed:
                raise EventLogError(f"{self.describe()}: used after close()")
            if kind == "admin":
                self._admin = self._admin or self._open(KafkaAdminClient, client_id=self._id)
                return self._admin
            if self._producer is None:
                self._producer = self._open(
                    KafkaProducer,
                    client_id=self._id,
                    acks="all",
                    enable_idempotence=True,
                    retries=2**31 - 1,  # bounded by the delivery timeout instead
                    delivery_timeout_ms=_DELIVERY_TIMEOUT_MS,
                    max_block_ms=_MAX_BLOCK_MS,
                    allow_auto_create_topics=False,
                    metrics_enabled=False,
                )
                _shorten_metadata_backoff(self._producer)
            return self._producer

    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists on the broker (this makes none).

        Raises:
            EventLogError: the broker does not answer.
        """
        if topic in self._topics:
            return True
        with self._translated(f"cannot list the topics of {self.describe()}"):
            return topic in set(self._client("admin").list_topics())

    def _ensure_topic(self, topic: str) -> None:
        """Create ``topic`` and the topics of its installation unless known to exist."""
        if topic in self._topics:
            return
        admin = self._client("admin")
        names = _installation_topics(topic)
        spec = {n: {"num_partitions": self._partitions, "replication_factor": 1} for n in names}
        with self._translated(f"cannot create topic {topic}"):
            response = admin.create_topics(
                spec, timeout_ms=_OPERATION_TIMEOUT_MS, raise_errors=False
            )
            for entry in response["topics"]:
                code = entry["error_code"]
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise for_code(code)(f"{entry['name']}: {entry['error_message']}")
            # Created is not yet usable: wait until every partition has a leader.
            admin.wait_for_topics(names, timeout_ms=_OPERATION_TIMEOUT_MS)
        self._topics.update(names)


def _shorten_metadata_backoff(producer: Any) -> None:
    """Let a new producer ask for its topic's partitions right after bootstrapping.

    The bootstrap learns the brokers, not the topics: the first ``send`` asks
    again, and kafka-python 3.0 holds that request back by its cluster
    metadata's ``retry_backoff_ms``, 100 ms that the producer's own setting does
    not reach. A coordinator process makes one producer for one append, so that
    wait was most of its result's latency on Kafka (bench/pipeline.py: a first
    append of 120 ms, 17 ms of it CPU). Failed refreshes keep their own
    exponential backoff (KIP-580), which this does not touch.
    """
    metadata = getattr(producer, "_metadata", None)
    config = getattr(metadata, "config", None)
    if isinstance(config, dict) and "retry_backoff_ms" in config:
        config["retry_backoff_ms"] = _METADATA_BACKOFF_MS


def _installation_topics(topic: str) -> list[str]:
    """Every topic of the Mayfly installation whose topic this is, else just ``topic``."""
    installation = installation_of(topic)
    return installation.all() if installation is not None else [topic]


def _to_record(r: Any) -> LogRecord:
    # A null value or header value (Mayfly never writes one) reads as empty.
    headers = tuple((name, data or b"") for name, data in r.headers)
    return LogRecord(r.topic, r.partition, r.offset, r.key, r.value or b"", headers, r.timestamp)


class _KafkaReader:
    """A kafka-python consumer of all partitions of some topics (manually assigned),
    positioned at a group's committed offsets; what both consumer shapes share."""

    def __init__(
        self, log: KafkaEventLog, group: str, topics: Sequence[str], **configs: Any
    ) -> None:
        self._log, self._pid, self._closed = log, os.getpid(), False
        self._names = ", ".join(topics)
        self._consumer = log._open(
            KafkaConsumer,
            client_id=log._id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,
            metrics_enabled=False,
            **configs,
        )
        try:
            with log._translated(f"cannot read {self._names} for group {group}"):
                self._tps: dict[str, dict[int, TopicPartition]] = {}
                for topic in topics:
                    partitions = sorted(self._consumer.partitions_for_topic(topic) or ())
                    if not partitions:
                        raise EventLogError(f"{log.describe()}: topic {topic} has no partitions")
                    self._tps[topic] = {p: TopicPartition(topic, p) for p in partitions}
                self._start([tp for of_topic in self._tps.values() for tp in of_topic.values()])
        except BaseException:
            self.close()
            raise

    def _start(self, every: list[TopicPartition]) -> None:
        self._consumer.assign(every)
        # Position every partition now: left to poll(), finding the committed
        # offsets and resetting the others takes several polls of round trips.
        committed = self._committed(every)
        starts = self._consumer.beginning_offsets(
            [tp for tp in every if tp not in committed], timeout_ms=_OPERATION_TIMEOUT_MS
        )
        for tp in every:
            self._consumer.seek(tp, committed[tp] if tp in committed else starts[tp])

    def _poll(self, max_records: int, timeout_s: float) -> list[LogRecord]:
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {max_records}")
        consumer = self._usable()
        with self._log._translated(f"cannot read {self._names}"):
            batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [_to_record(r) for records in batches.values() for r in records]

    def _resume(self, tps: Sequence[TopicPartition]) -> None:
        """Resume ``tps``, and drop what kafka-python parked of them meanwhile.

        kafka-python 3.0.12 parks the records it had fetched for a partition that
        gets paused, and gives them back after the resume only while it holds no
        other partition's records, which a drained batch still counts as: a
        parked partition is then never returned nor fetched again (seen: a lane
        whose partition stopped for good at one offset after a pause). Dropped,
        they are fetched again from the partition's position, which only moves
        with records returned.
        """
        consumer = self._usable()
        consumer.resume(*tps)
        fetcher = consumer._fetcher
        for tp in tps:
            parked = fetcher._paused_partition_records.pop(tp, None)
            if parked is not None:
                parked.drain()
            fetcher._paused_completed_fetches.pop(tp, None)

    def _commit(self, topic: str, offsets: Mapping[int, int], payload: dict[Any, Any]) -> None:
        """Add ``topic``'s ``offsets`` to ``payload``, refusing a partition it lacks."""
        partitions = self._tps.get(topic, {})
        for partition, offset in offsets.items():
            if partition not in partitions or offset < 0:
                raise EventLogError(
                    f"{self._log.describe()}: cannot commit offset {offset} of partition "
                    f"{partition}: topic {topic} has partitions {sorted(partitions)}"
                )
            payload[partitions[partition]] = OffsetAndMetadata(offset, "", -1)

    def _send_commit(self, payload: dict[Any, Any]) -> None:
        # Retriable errors (coordinator moving, broker paused) are retried until the timeout.
        with self._log._translated(f"cannot commit {self._names}"):
            if payload:
                self._usable().commit(payload, timeout_ms=_OPERATION_TIMEOUT_MS)

    def _committed(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets, for the partitions it ever committed."""
        consumer, found = self._usable(), {}
        with self._log._translated(f"cannot read committed offsets of {self._names}"):
            for tp in tps:
                offset = consumer.committed(tp, timeout_ms=_OPERATION_TIMEOUT_MS)
                if offset is not None:
                    found[tp] = int(offset)
        return found

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pid == os.getpid():
            self._consumer.close(autocommit=False, timeout_ms=int(_CLOSE_TIMEOUT_S * 1000))
        else:
            _INHERITED.append(self._consumer)

    def _usable(self) -> Any:
        if self._closed:
            raise EventLogError(f"{self._log.describe()}: consumer used after close()")
        if self._pid != os.getpid():  # its I/O thread stayed in the parent
            raise EventLogError(f"{self._log.describe()}: a consumer belongs to its process")
        return self._consumer


class _KafkaConsumer(_KafkaReader):
    """One group's reader of all partitions of one topic."""

    def __init__(self, log: KafkaEventLog, group: str, topic: str) -> None:
        self._topic = topic
        super().__init__(log, group, [topic])

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Up to ``max_records`` records after those already returned; wait up to ``timeout_s``.

        While no broker answers this returns ``[]``; the client reconnects in the
        background and reading resumes where it stopped.
        """
        return self._poll(max_records, timeout_s)

    def commit(self, offsets: Mapping[int, int]) -> None:
        """Durably store, per partition, the offset of the next record to read for the group."""
        payload: dict[Any, Any] = {}
        self._commit(self._topic, offsets, payload)
        self._send_commit(payload)

    def committed(self) -> dict[int, int]:
        """The group's committed offsets, for the partitions it ever committed."""
        found = self._committed(self._tps[self._topic].values())
        return {tp.partition: offset for tp, offset in found.items()}

    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset the next appended record will get.

        Asked of the partition leaders, which answer after any fetch in flight
        on the same connection (up to ``fetch_max_wait_ms``, 0.5 s, when idle).
        """
        tps = list(self._tps[self._topic].values())
        with self._log._translated(f"cannot read end offsets of {self._topic}"):
            ends = self._usable().end_offsets(tps, timeout_ms=_OPERATION_TIMEOUT_MS)
        return {tp.partition: int(offset) for tp, offset in ends.items()}


class _KafkaMultiConsumer(_KafkaReader):
    """One group's reader of all partitions of several topics, in one kafka-python
    consumer: a waiting poll is one fetch the broker holds until a record of any
    of them arrives (``fetch_min_bytes`` 1), at most ``fetch_max_wait_ms``."""

    def __init__(self, log: KafkaEventLog, group: str, topics: Sequence[str]) -> None:
        super().__init__(log, group, topics, fetch_max_wait_ms=_MULTI_FETCH_MAX_WAIT_MS)

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        """Up to ``max_records`` records of the topics not paused; wait up to ``timeout_s``.

        While no broker answers this returns ``[]``, as :meth:`_KafkaConsumer.poll`.
        """
        return self._poll(max_records, timeout_s)

    def pause(self, topic: str) -> None:
        """Fetch and return nothing more of ``topic`` until :meth:`resume`: records
        already fetched are kept back (kafka-python parks them), none skipped."""
        self._usable().pause(*self._of(topic))

    def resume(self, topic: str) -> None:
        self._resume(self._of(topic))

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Durably store, per topic and partition, the offset of the next record to read,
        all in one request."""
        payload: dict[Any, Any] = {}
        for topic, of_topic in offsets.items():
            self._commit(topic, of_topic, payload)
        self._send_commit(payload)

    def committed(self) -> dict[str, dict[int, int]]:
        """Per topic, the group's committed offsets of the partitions it ever committed."""
        found = self._committed(tp for of_topic in self._tps.values() for tp in of_topic.values())
        offsets: dict[str, dict[int, int]] = {topic: {} for topic in self._tps}
        for tp, offset in found.items():
            offsets[tp.topic][tp.partition] = offset
        return offsets

    def _of(self, topic: str) -> list[TopicPartition]:
        if topic not in self._tps:
            raise EventLogError(f"{self._log.describe()}: this consumer reads {self._names}")
        return list(self._tps[topic].values())


class _KafkaMember(_KafkaMultiConsumer):
    """A member of a group, sharing its topics' partitions with the other members.

    The rebalance listener runs on kafka-python's I/O thread while the thread
    that polls waits in ``poll`` for it, so the owner's :class:`Rebalance` is
    never called while the owner does anything else. Meanwhile the owner's
    commits (it finishes records while it drains) cannot block on that thread:
    they are kept and sent with the revoked partitions' positions.
    """

    shared = True

    def __init__(
        self, log: KafkaEventLog, group: str, topics: Sequence[str], rebalance: Rebalance | None
    ) -> None:
        self._rebalance = rebalance
        self._paused: set[str] = set()
        self._in_listener = False
        self._deferred: dict[TopicPartition, OffsetAndMetadata] = {}
        _KafkaReader.__init__(
            self,
            log,
            group,
            topics,
            fetch_max_wait_ms=_MULTI_FETCH_MAX_WAIT_MS,
            partition_assignment_strategy=(CooperativeStickyAssignor,),
            session_timeout_ms=_SESSION_TIMEOUT_MS,
        )

    def _start(self, every: list[TopicPartition]) -> None:
        self._consumer.subscribe(list(self._tps), listener=_Listener(self))

    def pause(self, topic: str) -> None:
        """As :meth:`_KafkaMultiConsumer.pause`, for the partitions of ``topic`` this
        member has now and those it gets later."""
        self._of(topic)
        self._paused.add(topic)
        self._usable().pause(*self._assigned(topic))

    def resume(self, topic: str) -> None:
        self._of(topic)
        self._paused.discard(topic)
        self._resume(self._assigned(topic))

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        self.commit_positions(
            {t: {p: Position(o) for p, o in of.items()} for t, of in offsets.items()}
        )

    def commit_positions(self, positions: Mapping[str, Mapping[int, Position]]) -> None:
        """Commit each position, the records done after its offset in the metadata.

        While the group rebalances, commits are refused: they are kept, and sent
        after the next poll (or by the listener, for partitions that leave).
        """
        payload: dict[Any, Any] = {}
        for topic, of_topic in positions.items():
            self._commit(topic, {p: pos.offset for p, pos in of_topic.items()}, payload)
            for partition, pos in of_topic.items():
                tp = self._tps[topic][partition]
                payload[tp] = OffsetAndMetadata(pos.offset, _encode_position(pos), -1)
        self._deferred.update(payload)
        if not self._in_listener:  # on the I/O thread: sent by the listener, see class doc
            self._flush()

    def poll(self, max_records: int = 100, timeout_s: float = 0.0) -> list[LogRecord]:
        self._join_if_needed()
        if self._deferred:  # before the poll: a failure here must not drop fetched records
            self._flush()
        return self._poll(max_records, max(timeout_s, _MEMBER_LEAST_POLL_S))

    def _join_if_needed(self) -> None:
        """Join (or rejoin) the group to the end, here, when the group asks to.

        kafka-python 3.0.12 drops a join that completes while no poll is waiting
        for it: a poll whose timeout ends first leaves the join running, and when
        the next poll finds nothing left to join, the member never becomes
        stable again (no heartbeat, commits refused) and the group soon gives
        its partitions to others without it being told (seen with the
        dispatcher's millisecond polls). So a join is waited for to its end
        before the short poll, and one found finished unawaited is made again.
        """
        coordinator = self._usable()._coordinator
        join = getattr(coordinator, "_join_task", None)
        if coordinator.rejoining and join is not None and join.is_done:
            coordinator.request_rejoin()
        if coordinator.rejoining or coordinator.need_rejoin():
            with self._log._translated(f"cannot join the group reading {self._names}"):
                coordinator.poll(timeout_ms=_JOIN_WAIT_MS)

    def _flush(self) -> None:
        owned = self._usable().assignment()
        payload = {tp: om for tp, om in self._deferred.items() if tp in owned}
        self._deferred = {}
        try:
            self._send_commit(payload)
        except EventLogError as exc:
            if isinstance(exc.__cause__, RebalanceInProgressError):
                self._deferred = {**payload, **self._deferred}
            elif isinstance(exc.__cause__, CommitFailedError):
                # Out of the group: the partitions are someone else's, who runs
                # from the last commit (the lost listener says which).
                _LOG.warning("%s: positions not committed: %s", self._names, exc)
            else:
                raise

    def _assigned(self, topic: str) -> list[TopicPartition]:
        return [tp for tp in self._consumer.assignment() if tp.topic == topic]

    # -- called by the listener, on kafka-python's I/O thread ---------------------

    async def assigned(self, added: set[TopicPartition]) -> None:
        for tp in added:  # partitions added to a topic after this member started
            self._tps.setdefault(tp.topic, {})[tp.partition] = tp
        coordinator = self._consumer._coordinator
        found = await coordinator.fetch_committed_offsets_async(
            added, timeout_ms=_OPERATION_TIMEOUT_MS
        )
        paused = [tp for tp in added if tp.topic in self._paused]
        if paused:
            self._consumer.pause(*paused)
        if self._rebalance is None:
            return
        for topic, partitions in _by_topic(added).items():
            positions = {}
            for partition in partitions:
                got = found.get(TopicPartition(topic, partition))
                positions[partition] = (
                    _decode_position(got.offset, got.metadata) if got else (Position(0))
                )
            self._in_listener = True
            try:
                self._rebalance.assigned(topic, positions)
            finally:
                self._in_listener = False

    async def revoked(self, revoked: set[TopicPartition]) -> None:
        coordinator = self._consumer._coordinator
        rebalance = self._rebalance
        self._in_listener = True
        try:
            if rebalance is not None:
                for topic, partitions in _by_topic(revoked).items():
                    rebalance.revoking(topic, partitions)
                deadline = time.monotonic() + _DRAIN_S
                while not rebalance.drain(_DRAIN_TURN_S):
                    if time.monotonic() >= deadline:
                        _LOG.warning(
                            "%s: giving up %s with requests still running on them",
                            self._names,
                            sorted(f"{tp.topic}/{tp.partition}" for tp in revoked),
                        )
                        break
                    await coordinator._net.sleep(0)  # heartbeats, between turns
                self.commit_positions(rebalance.positions())
        finally:
            self._in_listener = False
        payload, self._deferred = self._deferred, {}
        if payload:
            try:
                await coordinator._commit_offsets_sync_async(
                    payload, timeout_ms=_OPERATION_TIMEOUT_MS
                )
            except KafkaError as exc:
                # The next member starts from the last commit: those records may run again.
                _LOG.warning("%s: positions not committed on revoke: %s", self._names, exc)

    async def lost(self, lost: set[TopicPartition]) -> None:
        self._deferred = {tp: om for tp, om in self._deferred.items() if tp not in lost}
        if self._rebalance is not None:
            for topic, partitions in _by_topic(lost).items():
                self._rebalance.lost(topic, partitions)


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    # kafka-python awaits these on its I/O thread (coroutines, so the awaits
    # inside let heartbeats go on); see _KafkaMember.
    def __init__(self, member: _KafkaMember) -> None:
        self._member = member

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._member.assigned(assigned)

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._member.revoked(revoked)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._member.lost(lost)


def _by_topic(tps: Iterable[TopicPartition]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for tp in sorted(tps):
        grouped.setdefault(tp.topic, []).append(tp.partition)
    return grouped


def _encode_position(pos: Position) -> str:
    """``mayfly/1 until=N pending=a,b,...``: the records after the offset already done."""
    pending = sorted(o for o in pos.pending if pos.offset <= o < pos.done_until)
    until = pos.done_until
    if len(pending) > _MAX_PENDING_NOTED:  # claim less rather than overflow the broker's limit
        until, pending = pending[_MAX_PENDING_NOTED], pending[:_MAX_PENDING_NOTED]
    if until <= pos.offset:
        return ""
    return f"{_POSITION_MARK} until={until} pending={','.join(map(str, pending))}"


def _decode_position(offset: int, metadata: str | None) -> Position:
    """The position a commit says; a metadata Mayfly did not write claims nothing."""
    parts = dict(p.partition("=")[::2] for p in (metadata or "").split()[1:])
    if not (metadata or "").startswith(_POSITION_MARK + " "):
        return Position(offset)
    try:
        until = int(parts.get("until", ""))
        pending = frozenset(int(o) for o in parts.get("pending", "").split(",") if o)
    except ValueError:
        return Position(offset)
    return Position(offset, until, pending)
