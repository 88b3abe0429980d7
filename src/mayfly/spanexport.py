"""Bulk spans: an API tracer whose spans are plain records, exported from a child process.

The aggregator makes two or more spans per result, tens of thousands a second
when it catches up on a backlog. Through the SDK each span is a ``Span``
object with bounded attribute containers, a lock and span processor calls,
and the OTLP exporter then encodes it to protobuf in the batch thread, all
under one GIL with the decoding of the next records. Here:

- :class:`RecordTracer` implements the OpenTelemetry API ``Tracer``: library
  code is unchanged. Its spans keep what OTLP needs in slots and, when they
  end, leave one tuple (:data:`SpanRecord`) in a buffer. The SDK's sampler
  (``OTEL_TRACES_SAMPLER``) still decides; resource and scope are the SDK's.
- :class:`ProcessSpanExporter` ships each full buffer, pickled, to a child
  process that encodes it as an OTLP ``ExportTraceServiceRequest`` (the same
  message the SDK's encoder makes from the same spans) and posts it with the
  SDK's own OTLP/HTTP exporter. Each batch stays in the parent until the
  child acknowledges its export; a child that dies is reported, restarted,
  and sent the unacknowledged batches again, so nothing is dropped silently.
  :meth:`~ProcessSpanExporter.flush` returns once every span ended so far is
  exported (False if one was refused or time ran out).

Configured by :func:`mayfly.telemetry.configure_telemetry`; library code is
handed ``telemetry.bulk_tracer(...)`` through the API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

from mayfly.procs import child_pythonpath
from mayfly.spanids import next_id

__all__ = [
    "DEFAULT_BATCH_SPANS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_SCHEDULE_DELAY_S",
    "ProcessSpanExporter",
    "RecordTracer",
    "SpanRecord",
    "encode_records",
]

_LOG = logging.getLogger("mayfly.telemetry")

#: One ended span: trace id, span id, parent span id (0: a root), whether the
#: parent is remote, trace state (W3C header form), name, kind (the API enum's
#: value), start and end (ns), attributes, status code (the API enum's value),
#: status description, events ``(name, time_ns, attributes)``, links
#: ``(trace_id, span_id, is_remote, attributes)``, and the scope
#: ``(name, version)``.
SpanRecord = tuple[
    int,
    int,
    int,
    bool,
    str,
    str,
    int,
    int,
    int,
    dict[str, AttributeValue],
    int,
    "str | None",
    "tuple[tuple[str, int, dict[str, AttributeValue]], ...]",
    "tuple[tuple[int, int, bool, dict[str, AttributeValue]], ...]",
    tuple[str, str],
]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_OK = StatusCode.OK.value
_UNSET = StatusCode.UNSET.value
_NO_ATTRIBUTES: dict[str, AttributeValue] = {}


# --- Spans ----------------------------------------------------------------------


class _RecordSpan(trace.Span):
    """A recording span that becomes a :data:`SpanRecord` when it ends."""

    __slots__ = (
        "_attributes",
        "_context",
        "_ended",
        "_events",
        "_kind",
        "_links",
        "_name",
        "_parent",
        "_sink",
        "_start",
        "_status",
        "_status_text",
    )

    def __init__(
        self,
        sink: _Sink,
        name: str,
        span_context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, AttributeValue],
        links: tuple[tuple[int, int, bool, dict[str, AttributeValue]], ...],
        start: int,
    ) -> None:
        self._sink = sink
        self._name = name
        self._context = span_context
        self._parent = parent
        self._kind = kind.value
        self._attributes = attributes
        self._links = links
        self._events: list[tuple[str, int, dict[str, AttributeValue]]] = []
        self._start = start
        self._status = _UNSET
        self._status_text: str | None = None
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if not self._ended:
            self._attributes.update(attributes)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if not self._ended:
            self._attributes[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if not self._ended:
            moment = time.time_ns() if timestamp is None else timestamp
            self._events.append((name, moment, dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if not self._ended and context.is_valid:
            link = (context.trace_id, context.span_id, context.is_remote, dict(attributes or {}))
            self._links = (*self._links, link)

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, and UNSET never overrides what was set.
        if self._ended or self._status == _OK:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if code is StatusCode.UNSET:
            return
        self._status = code.value
        self._status_text = description if code is StatusCode.ERROR else None

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        recorded: dict[str, AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        ctx = self._context
        parent = self._parent
        self._sink.add(
            (
                ctx.trace_id,
                ctx.span_id,
                parent.span_id if parent is not None else 0,
                parent.is_remote if parent is not None else False,
                ctx.trace_state.to_header() if ctx.trace_state else "",
                self._name,
                self._kind,
                self._start,
                time.time_ns() if end_time is None else end_time,
                self._attributes,
                self._status,
                self._status_text,
                tuple(self._events),
                self._links,
                self._sink.scope,
            )
        )


class _Sink:
    """Where a tracer's spans go: an exporter's buffer, tagged with the scope."""

    __slots__ = ("add", "scope")

    def __init__(self, exporter: ProcessSpanExporter, scope: tuple[str, str]) -> None:
        self.add = exporter.add
        self.scope = scope


class RecordTracer(trace.Tracer):
    """An API tracer making :class:`_RecordSpan` spans for ``exporter``.

    Args:
        exporter: takes each ended span.
        sampler: the SDK provider's sampler (``tracer_provider.sampler``).
        name: instrumentation scope name.
        version: instrumentation scope version.
    """

    def __init__(
        self, exporter: ProcessSpanExporter, sampler: Sampler, name: str, version: str = ""
    ) -> None:
        self._sink = _Sink(exporter, (name, version))
        self._sampler = sampler
        # Ids need to be unique, not secret: the SDK's generator is the same.
        self._random = random.Random()  # noqa: S311

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            parent_context: SpanContext | None = None
            trace_id = next_id(128) or self._random.getrandbits(128) or 1
        else:
            parent_context = parent
            trace_id = parent.trace_id
        span_id = next_id(64) or self._random.getrandbits(64) or 1
        sampled = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
        span_context = SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=_SAMPLED
            if sampled.decision is Decision.RECORD_AND_SAMPLE
            else _NOT_SAMPLED,
            trace_state=sampled.trace_state,
        )
        if sampled.decision is not Decision.RECORD_AND_SAMPLE:
            # Recorded-but-unsampled spans are never exported: nothing to keep.
            return trace.NonRecordingSpan(span_context)
        return _RecordSpan(
            self._sink,
            name,
            span_context,
            parent_context,
            kind,
            dict(sampled.attributes) if sampled.attributes else {},
            tuple(
                (
                    link.context.trace_id,
                    link.context.span_id,
                    link.context.is_remote,
                    dict(link.attributes or {}),
                )
                for link in links or ()
                if link.context.is_valid
            ),
            time.time_ns() if start_time is None else start_time,
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


# --- OTLP encoding (in the child) ---------------------------------------------
#
# Protobuf's wire format written directly: the generated classes cost as much
# as the SDK's encoder (a message object per attribute, value and span), while
# most of a span's bytes repeat (attribute keys, statuses, device ids) and are
# encoded once and looked up. Field numbers are those of opentelemetry-proto's
# trace.proto, common.proto and resource.proto; the tests parse the output
# with the generated classes and compare it with the SDK's encoding.

_KV_CACHE_LIMIT = 200_000


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag`` is the key byte (field << 3 | 2)."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: object) -> bytes:
    # bool before int: True is an int too. AnyValue: 1 string, 2 bool, 3 int,
    # 4 double, 5 array, 7 bytes.
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        # ArrayValue: 1 repeated AnyValue.
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    return b""


class _Encoder:
    """Encodes records, remembering the KeyValue bytes of attributes seen before."""

    def __init__(self, resource: Mapping[str, AttributeValue], schema_url: str = "") -> None:
        self._kv: dict[tuple[str, object], bytes] = {}
        # ResourceSpans: 1 resource (Resource: 1 attributes), 3 schema_url.
        self._resource = _field(b"\x0a", self._attributes(b"\x0a", resource))
        self._schema = _field(b"\x1a", schema_url.encode()) if schema_url else b""
        self._scopes: dict[tuple[str, str], bytes] = {}

    def _key_value(self, key: str, value: object) -> bytes:
        # KeyValue: 1 key, 2 value.
        try:
            cache_key = (key, value)
            cached = self._kv.get(cache_key)
        except TypeError:  # a list value: not hashable, not cached
            return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))
        if cached is None:
            cached = _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))
            if len(self._kv) >= _KV_CACHE_LIMIT:
                self._kv.clear()
            self._kv[cache_key] = cached
        return cached

    def _attributes(self, tag: bytes, attributes: Mapping[str, object]) -> bytes:
        key_value = self._key_value
        return b"".join([_field(tag, key_value(k, v)) for k, v in attributes.items()])

    def _scope(self, scope: tuple[str, str]) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            # InstrumentationScope: 1 name, 2 version.
            name, version = scope
            body = _field(b"\x0a", name.encode()) if name else b""
            body += _field(b"\x12", version.encode()) if version else b""
            encoded = self._scopes[scope] = _field(b"\x0a", body)
        return encoded

    def span(self, record: SpanRecord) -> bytes:
        (
            trace_id,
            span_id,
            parent_id,
            parent_remote,
            trace_state,
            name,
            kind,
            start,
            end,
            attributes,
            status,
            status_text,
            events,
            links,
            _scope,
        ) = record
        # Span: 1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name,
        # 6 kind, 7 start (fixed64), 8 end (fixed64), 9 attributes, 11 events,
        # 13 links, 15 status, 16 flags (fixed32).
        parts = [
            b"\x0a\x10" + trace_id.to_bytes(16, "big"),
            b"\x12\x08" + span_id.to_bytes(8, "big"),
        ]
        if trace_state:
            parts.append(_field(b"\x1a", trace_state.encode()))
        if parent_id:
            parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
        parts.append(_field(b"\x2a", name.encode()))
        # The OTLP enum counts from UNSPECIFIED = 0; the API's from INTERNAL = 0.
        parts.append(b"\x30" + _SMALL[kind + 1])
        parts.append(b"\x39" + start.to_bytes(8, "little") + b"\x41" + end.to_bytes(8, "little"))
        if attributes:
            parts.append(self._attributes(b"\x4a", attributes))
        for e_name, e_time, e_attributes in events:
            # Event: 1 time (fixed64), 2 name, 3 attributes.
            body = b"\x09" + e_time.to_bytes(8, "little") + _field(b"\x12", e_name.encode())
            parts.append(_field(b"\x5a", body + self._attributes(b"\x1a", e_attributes)))
        for l_trace, l_span, l_remote, l_attributes in links:
            # Link: 1 trace_id, 2 span_id, 4 attributes, 6 flags (fixed32).
            body = b"\x0a\x10" + l_trace.to_bytes(16, "big") + b"\x12\x08"
            body += l_span.to_bytes(8, "big") + self._attributes(b"\x22", l_attributes)
            parts.append(_field(b"\x6a", body + b"\x35" + _flags(l_remote)))
        # Status: 2 message, 3 code.
        message = _field(b"\x12", status_text.encode()) if status_text else b""
        parts.append(_field(b"\x7a", message + (b"\x18" + _SMALL[status] if status else b"")))
        parts.append(b"\x85\x01" + _flags(parent_remote))
        return b"".join(parts)

    def request(self, records: Sequence[SpanRecord]) -> bytes:
        by_scope: dict[tuple[str, str], list[bytes]] = {}
        span = self.span
        for record in records:
            scope = record[14]
            spans = by_scope.get(scope)
            if spans is None:
                spans = by_scope[scope] = []
            spans.append(_field(b"\x12", span(record)))
        # ScopeSpans: 1 scope, 2 spans.
        scope_spans = b"".join(
            _field(b"\x12", self._scope(scope) + b"".join(spans))
            for scope, spans in by_scope.items()
        )
        # ExportTraceServiceRequest: 1 resource_spans.
        return _field(b"\x0a", self._resource + scope_spans + self._schema)


def _flags(is_remote: bool) -> bytes:
    # SpanFlags (fixed32): "has is_remote" (0x100), and "is remote" (0x200).
    return b"\x00\x03\x00\x00" if is_remote else b"\x00\x01\x00\x00"


def encode_records(
    records: Sequence[SpanRecord],
    resource: Mapping[str, AttributeValue],
    resource_schema_url: str = "",
) -> bytes:
    """The OTLP/protobuf ``ExportTraceServiceRequest`` of ``records``, serialised.

    The message the SDK's ``encode_spans`` makes of the same spans: one
    resource, spans grouped by instrumentation scope in order of appearance.
    """
    return _Encoder(resource, resource_schema_url).request(records)


# --- The export process ---------------------------------------------------------

#: Spans per batch shipped to the child, as the SDK's batch processor sends.
DEFAULT_BATCH_SPANS = 1024
#: Batches shipped but not yet exported before :meth:`ProcessSpanExporter.add`
#: waits: bounds the memory a stalled endpoint can take.
DEFAULT_MAX_IN_FLIGHT = 64
#: A partly filled batch waits at most this long before it is shipped.
DEFAULT_SCHEDULE_DELAY_S = 1.0
_RESTART_BACKOFF_S = 1.0
#: Where ``mayfly`` is imported from, for the child's ``-m mayfly.spanexport``.


def _child_main(batches: Connection, acks: Connection) -> None:
    """The export process: encode each batch, post it, acknowledge it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # From the parent that started this process, over its own pipe.
    endpoint, resource, schema_url = pickle.loads(batches.recv_bytes())  # noqa: S301

    # The SDK's exporter, for its HTTP client (headers, timeout, compression,
    # TLS and retries as ``OTEL_EXPORTER_OTLP_*`` configure them); it is given
    # bytes already encoded.
    exporter = OTLPSpanExporter(endpoint=endpoint)
    client = exporter._client
    encoder = _Encoder(resource, schema_url)
    while True:
        try:
            message = batches.recv_bytes()
        except EOFError:
            break
        if not message:
            break
        seq = int.from_bytes(message[:8], "big")
        try:
            records = pickle.loads(message[8:])  # noqa: S301
            result = client.export(encoder.request(records))
            error = None
            if not result.success:
                error = f"{result.status_code} {result.reason or result.error}"
        except Exception as exc:  # reported to the parent, which logs it
            error = f"{type(exc).__name__}: {exc}"
        acks.send((seq, error))
    exporter.shutdown()  # type: ignore[no-untyped-call]


class ProcessSpanExporter:
    """Buffers :data:`SpanRecord` s and exports them, batch by batch, from a child process.

    Args:
        endpoint: the OTLP/HTTP traces URL (``http://127.0.0.1:4318/v1/traces``).
        resource: resource attributes of every span.
        resource_schema_url: the resource's schema URL, if any.
        batch_spans: spans per batch.
        max_in_flight: batches shipped and not yet acknowledged before
            :meth:`add` waits for the child.
        schedule_delay_s: longest a partial batch waits to be shipped.
    """

    def __init__(
        self,
        endpoint: str,
        resource: Mapping[str, AttributeValue],
        resource_schema_url: str = "",
        *,
        batch_spans: int = DEFAULT_BATCH_SPANS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        schedule_delay_s: float = DEFAULT_SCHEDULE_DELAY_S,
    ) -> None:
        self.endpoint = endpoint
        self._resource = dict(resource)
        self._schema_url = resource_schema_url
        self._batch_spans = batch_spans
        self._max_in_flight = max_in_flight
        self._delay = schedule_delay_s
        self._buffer: list[SpanRecord] = []
        self._buffer_lock = threading.Lock()
        # Shipping (pickling and writing to the pipe) takes `_send_lock`; the
        # books of batches in flight take `_state`, never held while writing,
        # so the ack reader is never stuck behind a full pipe.
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._in_flight: dict[int, tuple[bytes, int]] = {}
        self._seq = 0
        self._failed = 0
        self._closed = False
        #: Times the export process was found dead and started again.
        self.restarts = 0
        self._started_at = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._batches: Connection | None = None
        self._start_child()
        self._reader = threading.Thread(
            target=self._read_acks, name="mayfly-span-export", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        """The export process's pid."""
        return None if self._process is None else int(self._process.pid)

    def _start_child(self) -> None:
        # A fresh interpreter (`python -m mayfly.spanexport`), not a fork: the
        # parent has threads (Kafka clients, the SDK's), whose locks a fork
        # would copy held; and not multiprocessing's spawn, which imports the
        # parent's __main__ again. Two one-way pipes; the parent drops the
        # child's ends, so a dead child shows as EOF and a broken pipe.
        child_batches, batches = os.pipe()
        acks, child_acks = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "mayfly.spanexport", str(child_batches), str(child_acks)],
                pass_fds=(child_batches, child_acks),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(child_batches)
            os.close(child_acks)
        self._process, self._batches, self._acks = process, Connection(batches), Connection(acks)
        self._started_at = time.monotonic()
        self._batches.send_bytes(pickle.dumps((self.endpoint, self._resource, self._schema_url)))

    # --- hot path

    def add(self, record: SpanRecord) -> None:
        """Take one ended span; ships the buffer once it holds a batch."""
        if self._closed:
            return
        with self._buffer_lock:
            buffer = self._buffer
            buffer.append(record)
            if len(buffer) < self._batch_spans:
                return
            self._buffer = []
        self._ship(buffer)

    def _ship(self, records: list[SpanRecord]) -> None:
        payload = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)
        with self._state:
            while len(self._in_flight) >= self._max_in_flight and not self._closed:
                self._state.wait(1.0)
        # Booked and sent under one lock, so a restart in between neither
        # misses this batch nor sends it twice.
        with self._send_lock:
            with self._state:
                self._seq += 1
                seq = self._seq
                message = seq.to_bytes(8, "big") + payload
                self._in_flight[seq] = (message, len(records))
            self._send(message)

    def _send(self, message: bytes) -> None:
        # Under `_send_lock`. A child that died is noticed by the ack reader,
        # which restarts it and sends what is in flight again, this included.
        batches = self._batches
        if batches is None:
            return
        with contextlib.suppress(OSError):
            batches.send_bytes(message)

    def _ship_buffer(self) -> None:
        with self._buffer_lock:
            buffer, self._buffer = self._buffer, []
        if buffer:
            self._ship(buffer)

    # --- the ack reader (also ships partial batches on time)

    def _read_acks(self) -> None:
        last_ship = time.monotonic()
        while True:
            acks = self._acks
            try:
                ready = acks.poll(min(self._delay, 0.5))
                ack = acks.recv() if ready else None
            except (EOFError, OSError):
                if self._closed:
                    return
                self._restart()
                continue
            if ack is not None:
                seq, error = ack
                with self._state:
                    _message, count = self._in_flight.pop(seq, (b"", 0))
                    if error is not None:
                        # Said before a waiting flush() learns of it and returns.
                        _LOG.error("%d span(s) not exported to %s: %s", count, self.endpoint, error)
                        self._failed += count
                    self._state.notify_all()
            elif self._closed:
                return
            if time.monotonic() - last_ship >= self._delay:
                last_ship = time.monotonic()
                self._ship_buffer()

    def _restart(self) -> None:
        process = self._process
        assert process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        _LOG.error(
            "the span export process (pid %s) exited with code %s; restarting it and"
            " sending its unexported batches again",
            process.pid,
            process.returncode,
        )
        # A child that dies at once (a broken environment) is not restarted in
        # a tight loop.
        wait = _RESTART_BACKOFF_S - (time.monotonic() - self._started_at)
        if wait > 0:
            time.sleep(wait)
        with self._send_lock:
            if self._batches is not None:
                self._batches.close()
            self._start_child()
            self.restarts += 1
            with self._state:
                pending = sorted(self._in_flight.items())
            for _seq, (message, _count) in pending:
                self._send(message)

    # --- flush and shutdown

    def flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every span ended so far; True when all went out in time, none refused."""
        deadline = time.monotonic() + timeout_millis / 1000
        self._ship_buffer()
        with self._state:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._state.wait(left)
            failed, self._failed = self._failed, 0
        return failed == 0

    def shutdown(self, timeout_millis: int = 30_000) -> bool:
        """Flush, then stop the export process. Later spans are dropped."""
        if self._closed:
            return True
        flushed = self.flush(timeout_millis)
        self._closed = True
        with self._state:
            self._state.notify_all()
        with self._send_lock:
            self._send(b"")
            process = self._process
            if process is not None:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.terminate()
                    process.wait(5)
        self._reader.join(5)
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        self._acks.close()
        return flushed


if __name__ == "__main__":
    _child_main(Connection(int(sys.argv[1])), Connection(int(sys.argv[2])))
