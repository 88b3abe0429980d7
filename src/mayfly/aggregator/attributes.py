"""Attribute names of the aggregator's spans and metrics.

OpenTelemetry semantic conventions for CloudEvents and messaging are spelled
out here rather than imported from ``opentelemetry.semconv._incubating``,
whose module path is not stable; Mayfly's own names start with ``mayfly.``.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CE_EVENT_ID",
    "CE_EVENT_SOURCE",
    "CE_EVENT_TYPE",
    "CE_SPEC_VERSION",
    "COLD_START_MS",
    "COORDINATOR_ID",
    "COORDINATOR_MODE",
    "DEVICE_ATTEMPTS",
    "DEVICE_COUNT",
    "DEVICE_ID",
    "DEVICE_STATUS",
    "LOG_ATTEMPT",
    "LOG_LEVEL",
    "LOG_MESSAGE",
    "MESSAGING_DESTINATION",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "PACKAGE_DIGEST",
    "PACKAGE_VERSION",
    "PROGRESS_PERCENT",
    "REJECTED_STATUS",
    "REJECTION_CODE",
    "REJECTION_FIELD",
    "REQUEST_ID",
    "REQUEST_STATUS",
    "TASK",
]

# Semantic conventions.
CE_EVENT_ID: Final = "cloudevents.event_id"
CE_EVENT_TYPE: Final = "cloudevents.event_type"
CE_EVENT_SOURCE: Final = "cloudevents.event_source"
CE_SPEC_VERSION: Final = "cloudevents.event_spec_version"
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"

# Mayfly's own.
TASK: Final = "mayfly.task"
REQUEST_ID: Final = "mayfly.request.id"
REQUEST_STATUS: Final = "mayfly.request.status"
PACKAGE_VERSION: Final = "mayfly.package.version"
PACKAGE_DIGEST: Final = "mayfly.package.digest"
DEVICE_ID: Final = "mayfly.device.id"
DEVICE_STATUS: Final = "mayfly.device.status"
DEVICE_ATTEMPTS: Final = "mayfly.device.attempts"
DEVICE_COUNT: Final = "mayfly.device.count"
COLD_START_MS: Final = "mayfly.cold_start_ms"
COORDINATOR_ID: Final = "mayfly.coordinator.id"
COORDINATOR_MODE: Final = "mayfly.coordinator.mode"
REJECTION_CODE: Final = "mayfly.rejection.code"
REJECTION_FIELD: Final = "mayfly.rejection.field"
# On a device span's events: a line the package wrote (``log``), or its
# progress report (``progress``).
LOG_LEVEL: Final = "mayfly.log.level"
LOG_MESSAGE: Final = "mayfly.log.message"
LOG_ATTEMPT: Final = "mayfly.log.attempt"
PROGRESS_PERCENT: Final = "mayfly.progress.percent"

#: ``mayfly.request.status`` of a rejected request (the other values are
#: :class:`~mayfly.events.OverallStatus`).
REJECTED_STATUS: Final = "rejected"
