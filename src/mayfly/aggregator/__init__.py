"""The aggregator: results into traces, metrics, an archive and insights.

::

    TaskCompleted (parts) ─┐               ┌─▶ ResultArchive ─▶ insights ─▶ mayfly report
    TaskRejected ──────────┴─▶ Aggregator ─┴─▶ ResultTracer + ResultMetrics ─▶ OpenTelemetry

The core takes a ``Tracer`` and a ``Meter`` (configured at the edge by
:func:`mayfly.telemetry.configure_telemetry`) and a :class:`ResultArchive`.
:mod:`mayfly.aggregator.insights` computes reports from archived events with no
I/O; :mod:`mayfly.aggregator.entry` builds the whole from the environment for
the Knative function.
"""

from __future__ import annotations

from mayfly.aggregator.archive import (
    ENV_ARCHIVE,
    ArchivedEvent,
    BucketResultArchive,
    LocalResultArchive,
    ResultArchive,
    archive_location_from_env,
    decode_archived,
    encode_archived,
    event_time,
    open_archive,
)
from mayfly.aggregator.core import Aggregator, Outcome
from mayfly.aggregator.metrics import ResultMetrics
from mayfly.aggregator.tracing import DEFAULT_DESTINATION, ResultTracer
from mayfly.aggregator.windows import task_window

__all__ = [
    "DEFAULT_DESTINATION",
    "ENV_ARCHIVE",
    "Aggregator",
    "ArchivedEvent",
    "BucketResultArchive",
    "LocalResultArchive",
    "Outcome",
    "ResultArchive",
    "ResultMetrics",
    "ResultTracer",
    "archive_location_from_env",
    "decode_archived",
    "encode_archived",
    "event_time",
    "open_archive",
    "task_window",
]
