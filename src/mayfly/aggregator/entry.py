"""The aggregator behind an HTTP endpoint (Knative), configured from the environment.

Environment, beyond :class:`~mayfly.settings.Settings` (``MAYFLY_HOME``,
``MAYFLY_S3_*``) and :mod:`mayfly.telemetry`'s (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``MAYFLY_TRACE_FILE``):

========================  ====================================================
``MAYFLY_ARCHIVE``        result archive: a folder or ``s3://BUCKET[/PREFIX]``.
                          Default ``$MAYFLY_HOME/archive``.
``MAYFLY_RESULTS_TOPIC``  ``messaging.destination.name`` of the spans.
                          Default ``mayfly.results``.
========================  ====================================================

Answers, for a Kafka Broker Trigger or a KafkaSource sink:

- ``202`` with an empty body: the event was taken (processed, buffered as a
  part, or a duplicate), or it is not a result (a request on a shared broker);
- ``400`` with an empty body: not a decodable Mayfly event, or a part that
  contradicts its siblings. Knative's data-plane contract reads 400 as
  "unparsable event": a failed delivery that is not retried, so the event
  goes straight to the Trigger's dead-letter sink. That is where it belongs:
  kept for a person to look at (nothing is dropped silently), while a 2xx
  would acknowledge and lose it and a 5xx would retry what cannot succeed;
- ``503``: the archive is unreachable; the delivery is retried later.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from mayfly.aggregator.archive import ResultArchive, archive_location_from_env, open_archive
from mayfly.aggregator.core import Aggregator, Outcome
from mayfly.aggregator.tracing import DEFAULT_DESTINATION
from mayfly.errors import EventError, StoreError
from mayfly.events import TaskCompleted, TaskRejected, from_http
from mayfly.settings import Settings
from mayfly.telemetry import Telemetry, configure_telemetry, telemetry_options_from_env

__all__ = ["ENV_RESULTS_TOPIC", "AggregatorService", "service_from_env"]

ENV_RESULTS_TOPIC = "MAYFLY_RESULTS_TOPIC"
_LOG = logging.getLogger("mayfly.aggregator")


@dataclass
class AggregatorService:
    """An aggregator with the telemetry and archive it was built with."""

    aggregator: Aggregator
    telemetry: Telemetry
    archive: ResultArchive

    def handle_http(self, headers: Mapping[str, str], body: bytes) -> int:
        """One CloudEvent delivery; returns the HTTP status to answer with an empty body."""
        try:
            event = from_http(dict(headers), body)
        except EventError as exc:
            _LOG.warning("undecodable event (answering 400 for the dead-letter sink): %s", exc)
            return 400
        if not isinstance(event, TaskCompleted | TaskRejected):
            return 202  # a request on a shared broker: not ours
        try:
            outcome = self.aggregator.handle(event)
        except StoreError:
            _LOG.exception("result not archived; answering 503 so it is redelivered")
            return 503
        return 400 if outcome is Outcome.INVALID else 202

    def flush(self) -> bool:
        """Export the spans and measurements recorded so far."""
        return self.telemetry.flush()

    def close(self) -> None:
        """Flush and stop telemetry (call on shutdown)."""
        self.telemetry.shutdown()


def service_from_env(
    service_name: str = "mayfly-aggregator",
    environ: Mapping[str, str] | None = None,
    *,
    messaging_system: str = "kafka",
) -> AggregatorService:
    """Build the aggregator, its telemetry and its archive from the environment.

    Raises:
        ConfigError: for invalid settings.
    """
    env = os.environ if environ is None else environ
    settings = Settings.from_env(env)
    options = telemetry_options_from_env(settings.home, env)
    telemetry = configure_telemetry(
        service_name,
        otlp_endpoint=options.otlp_endpoint,
        trace_file=options.trace_file,
        metrics_endpoint=options.metrics_endpoint,
    )
    archive = open_archive(archive_location_from_env(settings.home, env), settings)
    aggregator = Aggregator(
        telemetry.tracer("mayfly.aggregator"),
        telemetry.meter("mayfly.aggregator"),
        archive,
        messaging_system=messaging_system,
        destination=env.get(ENV_RESULTS_TOPIC) or DEFAULT_DESTINATION,
    )
    _LOG.info("traces to %s, results archived in %s", telemetry.destination, archive.describe())
    return AggregatorService(aggregator, telemetry, archive)
