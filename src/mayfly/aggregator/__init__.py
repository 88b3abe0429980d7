"""The aggregator: results into traces, metrics, an archive and insights.

::

    TaskCompleted (parts) ─┐               ┌─▶ ResultArchive ─▶ insights ─▶ mayfly report
    TaskRejected ──────────┴─▶ Aggregator ─┴─▶ ResultTracer + ResultMetrics ─▶ OpenTelemetry

The core takes a ``Tracer`` and a ``Meter`` (configured at the edge by
:func:`mayfly.telemetry.configure_telemetry`) and a :class:`ResultArchive`.
:mod:`mayfly.aggregator.insights` computes reports from archived events with no
I/O; :mod:`mayfly.aggregator.ingest` feeds it from records or HTTP, and
:func:`mayfly.app.wiring.build_aggregator` builds the whole from settings for
``mayfly up``, the demo and the Knative function.
"""

from __future__ import annotations

from mayfly.aggregator.archive import (
    ArchivedEvent,
    BucketResultArchive,
    LocalResultArchive,
    ResultArchive,
    decode_archived,
    encode_archived,
    event_time,
)
from mayfly.aggregator.core import Aggregator, Outcome
from mayfly.aggregator.metrics import ResultMetrics
from mayfly.aggregator.tracing import ResultTracer
from mayfly.aggregator.windows import task_window

__all__ = [
    "Aggregator",
    "ArchivedEvent",
    "BucketResultArchive",
    "LocalResultArchive",
    "Outcome",
    "ResultArchive",
    "ResultMetrics",
    "ResultTracer",
    "decode_archived",
    "encode_archived",
    "event_time",
    "task_window",
]
