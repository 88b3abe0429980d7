"""The one place the OpenTelemetry SDK is configured.

Library code uses only ``opentelemetry-api`` and is handed a ``Tracer`` and a
``Meter``; an edge (CLI, function, local runtime) calls
:func:`configure_telemetry` once and passes ``telemetry.tracer(...)`` on.

Where telemetry goes, first match wins:

1. ``span_exporter``/``metric_reader`` given (tests: ``InMemorySpanExporter``,
   ``InMemoryMetricReader``);
2. ``otlp_endpoint`` (``OTEL_EXPORTER_OTLP_ENDPOINT``, e.g.
   ``http://127.0.0.1:4318``): OTLP over HTTP/protobuf to ``/v1/traces``
   (Jaeger v2, an OpenTelemetry Collector); the spans of
   :meth:`Telemetry.bulk_tracer` (the aggregator's) are encoded and posted
   from a child process instead (:mod:`mayfly.spanexport`);
3. ``trace_file``: OTLP-JSON lines, one ``ExportTraceServiceRequest`` per
   line, the format of OTLP/HTTP with JSON bodies and of the Collector's
   ``file`` exporter, so ``otelcol``'s ``otlpjsonfile`` receiver can replay it
   into Jaeger later.

Metrics leave the process only when asked (``metrics_endpoint``,
``metrics_file`` or a ``metric_reader``): Jaeger, the default OTLP endpoint,
accepts traces only, and a metrics pipeline pointed at it would fail every
export.

Where to, as the user configured it (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``, ``MAYFLY_TRACE_FILE`` and their
flags), is read once by :class:`mayfly.settings.Settings`.

The SDK's own variables (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``,
``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``) keep working.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

from mayfly import __version__
from mayfly.errors import ConfigError
from mayfly.settings import ENV_OTLP_ENDPOINT, ENV_OTLP_METRICS_ENDPOINT
from mayfly.spanexport import ProcessSpanExporter, RecordTracer
from mayfly.spanids import next_id

if TYPE_CHECKING:
    from google.protobuf.message import Message

__all__ = [
    "DEFAULT_DEVICE_SERIES_LIMIT",
    "DEFAULT_MAX_QUEUE_SIZE",
    "OtlpJsonFileMetricExporter",
    "OtlpJsonFileSpanExporter",
    "Telemetry",
    "configure_telemetry",
    "metrics_to_otlp_json",
    "spans_to_otlp_json",
]


#: Spans buffered before the batch processor drops any. The SDK's default
#: (2048) overflows when an aggregator catches up on a backlog of results.
DEFAULT_MAX_QUEUE_SIZE = 65_536
_MAX_EXPORT_BATCH = 1024
#: Series (attribute sets) kept per ``mayfly.device.*`` metric, which carry
#: device ids; beyond it the SDK folds new series into one overflow series.
DEFAULT_DEVICE_SERIES_LIMIT = 200_000
_LOG = logging.getLogger("mayfly.telemetry")

# OTLP/JSON differs from protobuf's canonical JSON mapping in two ways: trace
# and span ids are hex, not base64, and enums are integers.
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


# --- OTLP-JSON encoding -------------------------------------------------------


def _otlp_dict(message: Message) -> dict[str, Any]:
    # protobuf and the OTLP encoders are imported by what writes files only: a
    # runtime exporting over OTLP/HTTP encodes its spans in a child process.
    from google.protobuf.json_format import MessageToDict

    encoded: dict[str, Any] = MessageToDict(message, use_integers_for_enums=True)
    return encoded


def _hex_ids(record: dict[str, Any]) -> None:
    for name in _ID_FIELDS:
        value = record.get(name)
        if value:
            record[name] = base64.b64decode(value).hex()


def spans_to_otlp_json(spans: Sequence[ReadableSpan]) -> dict[str, Any]:
    """One OTLP/JSON ``ExportTraceServiceRequest`` holding ``spans``.

    Encoded by the OTLP exporters' own protobuf encoder, then mapped to JSON
    as OTLP/HTTP specifies (hex ids, integer enums, lowerCamelCase names).
    """
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request = _otlp_dict(encode_spans(spans))
    for resource_spans in request.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _hex_ids(span)
                for link in span.get("links", ()):
                    _hex_ids(link)
    return request


def metrics_to_otlp_json(data: MetricsData) -> dict[str, Any]:
    """One OTLP/JSON ``ExportMetricsServiceRequest`` holding ``data``."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    request = _otlp_dict(encode_metrics(data))
    # Exemplars carry trace and span ids too.
    for resource_metrics in request.get("resourceMetrics", ()):
        for scope_metrics in resource_metrics.get("scopeMetrics", ()):
            for metric in scope_metrics.get("metrics", ()):
                for kind in metric.values():
                    if isinstance(kind, dict):
                        for point in kind.get("dataPoints", ()):
                            for exemplar in point.get("exemplars", ()):
                                _hex_ids(exemplar)
    return request


def _ends_a_line(path: Path) -> bool:
    """Whether a file is empty or ends with a newline."""
    with path.open("rb") as existing:
        if existing.seek(0, 2) == 0:
            return True
        existing.seek(-1, 2)
        return existing.read(1) == b"\n"


class _JsonLines:
    """An append-only file of JSON objects, one per line, shared by threads
    (and by the exporters of one process that write one file: :meth:`of`)."""

    _open: ClassVar[dict[Path, _JsonLines]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def of(cls, path: Path) -> _JsonLines:
        """The writer of ``path`` in this process: two exporters of one file (a
        publisher's and an aggregator's spans) share its lock, so their lines
        never interleave."""
        key = path.absolute()
        with cls._registry_lock:
            found = cls._open.get(key)
            if found is None:
                found = cls._open[key] = cls(path)
            return found

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
                if not _ends_a_line(self.path):
                    # A process killed mid-write left half a line: end it, so this
                    # process's lines stay whole (readers skip the torn one).
                    self._file.write("\n")
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class OtlpJsonFileSpanExporter(SpanExporter):
    """Writes each batch of spans as one OTLP/JSON line to a file."""

    def __init__(self, path: Path) -> None:
        self._out = _JsonLines.of(path)

    @property
    def path(self) -> Path:
        return self._out.path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            self._out.write(spans_to_otlp_json(spans))
        except OSError:
            _LOG.exception("cannot write spans to %s", self._out.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._out.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class OtlpJsonFileMetricExporter(MetricExporter):
    """Writes each metrics collection as one OTLP/JSON line to a file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._out = _JsonLines.of(path)

    @property
    def path(self) -> Path:
        return self._out.path

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            self._out.write(metrics_to_otlp_json(metrics_data))
        except OSError:
            _LOG.exception("cannot write metrics to %s", self._out.path)
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._out.close()


class _OnFirstExport(SpanExporter):
    """The SDK's OTLP/HTTP span exporter, made when the first batch is exported.

    The bulk tracer's spans leave through a child process; this one carries
    only spans of ordinary tracers, which many processes never make, and the
    exporter's client (requests, protobuf) is over 15 MB of memory.
    """

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._exporter: SpanExporter | None = None
        self._lock = threading.Lock()

    def _made(self) -> SpanExporter:
        with self._lock:
            if self._exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                self._exporter = OTLPSpanExporter(endpoint=self._endpoint)
            return self._exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._made().export(spans)

    def shutdown(self) -> None:
        if self._exporter is not None:
            self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis) if self._exporter is not None else True


# --- Configuration -------------------------------------------------------------


class _DerivedIdGenerator(RandomIdGenerator):
    """The SDK's ids, or the ones :func:`mayfly.spanids.derived_ids` derives."""

    def generate_span_id(self) -> int:
        return next_id(64) or super().generate_span_id()

    def generate_trace_id(self) -> int:
        return next_id(128) or super().generate_trace_id()


@dataclass
class Telemetry:
    """Configured providers; hand ``tracer()``/``meter()`` to library code.

    Call :meth:`shutdown` (or at least :meth:`flush`) before the process
    exits: spans are exported in batches from a background thread.
    """

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    #: Human-readable destination of the traces, for a log line.
    destination: str = "nowhere"
    #: OTLP/HTTP traces URL that :meth:`bulk_tracer` exports to, if any.
    bulk_endpoint: str | None = None
    _bulk: ProcessSpanExporter | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

    def tracer(self, name: str = "mayfly") -> trace.Tracer:
        return self.tracer_provider.get_tracer(name, __version__)

    def bulk_tracer(self, name: str = "mayfly") -> trace.Tracer:
        """A tracer for many short spans (the aggregator's), through the same API.

        With an OTLP endpoint its spans are plain records, encoded and posted
        from a child process (:mod:`mayfly.spanexport`), off the GIL of the
        code making them; the provider's sampler and resource still apply.
        Otherwise it is :meth:`tracer`. :meth:`flush` and :meth:`shutdown`
        cover both.
        """
        if self.bulk_endpoint is None:
            return self.tracer(name)
        with self._lock:
            if self._closed:
                return self.tracer(name)
            if self._bulk is None:
                resource = self.tracer_provider.resource
                self._bulk = ProcessSpanExporter(
                    self.bulk_endpoint, resource.attributes, resource.schema_url
                )
        return RecordTracer(self._bulk, self.tracer_provider.sampler, name, __version__)

    def meter(self, name: str = "mayfly") -> metrics.Meter:
        return self.meter_provider.get_meter(name, __version__)

    def flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything recorded so far; True when it all went out in time."""
        bulk = self._bulk.flush(timeout_millis) if self._bulk is not None else True
        spans = self.tracer_provider.force_flush(timeout_millis)
        measurements = self.meter_provider.force_flush(timeout_millis)
        return bool(bulk and spans and measurements)

    def flush_traces(self, timeout_millis: int = 30_000) -> bool:
        """Export the spans made so far (not the measurements); True when all went out."""
        bulk = self._bulk.flush(timeout_millis) if self._bulk is not None else True
        return bool(bulk and self.tracer_provider.force_flush(timeout_millis))

    def shutdown(self) -> None:
        """Flush and stop the exporters; later spans are dropped. Idempotent."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        if self._bulk is not None:
            self._bulk.shutdown()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _signal_url(endpoint: str, signal: str) -> str:
    base = endpoint.rstrip("/")
    path = f"/v1/{signal}"
    return base if base.endswith(path) else base + path


def configure_telemetry(
    service_name: str,
    *,
    otlp_endpoint: str | None = None,
    trace_file: Path | None = None,
    metrics_endpoint: str | None = None,
    metrics_file: Path | None = None,
    metrics_interval_millis: int = 60_000,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    device_series_limit: int = DEFAULT_DEVICE_SERIES_LIMIT,
    set_global: bool = False,
) -> Telemetry:
    """Build a tracer and a meter provider exporting as the arguments say.

    Args:
        service_name: ``service.name`` of the resource (``mayfly-aggregator``).
        otlp_endpoint: OTLP/HTTP base URL (``http://127.0.0.1:4318``); traces
            go to ``/v1/traces`` under it.
        trace_file: OTLP-JSON lines file, used when there is no endpoint.
        metrics_endpoint: OTLP/HTTP base or full ``/v1/metrics`` URL.
        metrics_file: OTLP-JSON lines file for metrics (when no endpoint).
        metrics_interval_millis: how often periodic readers export.
        span_exporter: takes precedence over endpoint and file (tests).
        metric_reader: takes precedence over metrics endpoint and file (tests).
        resource_attributes: more resource attributes.
        max_queue_size: spans the batch processor holds before dropping.
        device_series_limit: attribute sets kept per ``mayfly.device.*`` metric.
        set_global: also install the providers as the process-wide globals
            (an edge that runs instrumented third-party code). The API allows
            this once per process.

    Raises:
        ConfigError: when an endpoint is not an http(s) URL.
    """
    attributes: dict[str, str] = {"service.name": service_name, "service.version": __version__}
    attributes.update(resource_attributes or {})
    resource = Resource.create(attributes)

    tracer_provider = TracerProvider(resource=resource, id_generator=_DerivedIdGenerator())
    exporter: SpanExporter | None = span_exporter
    bulk_endpoint: str | None = None
    destination = "an in-process exporter" if span_exporter is not None else "nowhere"
    if exporter is None and otlp_endpoint:
        url = _signal_url(_check_url(otlp_endpoint, ENV_OTLP_ENDPOINT), "traces")
        exporter, destination, bulk_endpoint = _OnFirstExport(url), url, url
    elif exporter is None and trace_file is not None:
        exporter, destination = OtlpJsonFileSpanExporter(trace_file), str(trace_file)
    if exporter is not None:
        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=max_queue_size,
                max_export_batch_size=min(_MAX_EXPORT_BATCH, max_queue_size),
            )
        )

    readers: list[MetricReader] = []
    if metric_reader is not None:
        readers.append(metric_reader)
    elif metrics_endpoint:
        url = _signal_url(_check_url(metrics_endpoint, ENV_OTLP_METRICS_ENDPOINT), "metrics")
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )

        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=url), export_interval_millis=metrics_interval_millis
            )
        )
    elif metrics_file is not None:
        readers.append(
            PeriodicExportingMetricReader(
                OtlpJsonFileMetricExporter(metrics_file),
                export_interval_millis=metrics_interval_millis,
            )
        )
    # Per-device metrics carry the device id: one series per device, far above
    # the SDK's default limit of 2,000 series per metric for a large fleet.
    views = [
        View(instrument_name="mayfly.device.*", aggregation_cardinality_limit=device_series_limit)
    ]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=views)

    if set_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, destination, bulk_endpoint)


def _check_url(url: str, name: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{name}={url!r}: expected an http(s):// URL such as http://127.0.0.1:4318"
        )
    return url
