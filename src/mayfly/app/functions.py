"""What the Knative functions run: one coordinator pipeline or aggregator per instance.

``functions/coordinator/main.py``, ``functions/aggregator/main.py`` and
``functions/waker/main.py`` are thin functions-framework entry points over
these builders; each instance calls one once, on its first delivery, and
keeps what it returns.
"""

from __future__ import annotations

import atexit

from mayfly.app.installation import standalone_pipeline
from mayfly.app.wiring import (
    AggregatorService,
    build_aggregator,
    build_coordinator,
    open_sink,
)
from mayfly.coordinator import RequestPipeline
from mayfly.coordinator.http import Defer
from mayfly.runtime.deferred import WakeReport
from mayfly.settings import Settings

__all__ = ["aggregator_service", "coordinator_deferral", "coordinator_pipeline", "wake_deferred"]


def coordinator_pipeline() -> RequestPipeline:
    """A pipeline from the environment: results to ``K_SINK`` when set, else reply
    events; the shards of a large request to ``MAYFLY_SHARD_SINK`` when set;
    with ``MAYFLY_EVENT_LOG`` on Kafka, progress, checkpoints and cancels
    through it (:mod:`mayfly.app.installation`)."""
    settings = Settings.from_env()
    sink = open_sink(settings) if settings.result_sink != "-" else None
    coordinator = build_coordinator(settings, "knative")
    pipeline, state = standalone_pipeline(settings, coordinator, sink)
    if state is not None:
        atexit.register(state.close)
    return pipeline


def coordinator_deferral() -> Defer | None:
    """Where the coordinator function puts a request its schedule holds: the
    deferred topic's KafkaSink (``MAYFLY_DEFER_SINK``); None: nowhere (it is
    answered 503 with a Retry-After)."""
    settings = Settings.from_env()
    if not settings.defer_sink:
        return None
    from mayfly.coordinator.sinks import HttpSink

    sink = HttpSink(settings.defer_sink)
    return lambda headers, body: sink.post(sink.url, headers, body)


def wake_deferred() -> WakeReport:
    """The waker function's work for a PingSource's ping: the deferred
    requests due back on their lanes, through the configured event log, and
    those falling due before the next ping at their time."""
    from mayfly.app.wiring import open_event_log
    from mayfly.runtime.deferred import wake

    settings = Settings.from_env()
    log = open_event_log(settings)
    try:
        return wake(log, settings.topics)
    finally:
        log.close()


def aggregator_service() -> AggregatorService:
    """The aggregator from the environment; its spans are flushed when the process exits.

    Results reach it from Kafka through Knative, whatever ``MAYFLY_EVENT_LOG``
    says, so its spans say ``messaging.system: kafka``.
    """
    built = build_aggregator(Settings.from_env(), messaging_system="kafka")
    atexit.register(built.close)
    return built
