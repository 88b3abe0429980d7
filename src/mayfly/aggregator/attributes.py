"""Attribute names of the aggregator's spans and metrics.

The OpenTelemetry semantic conventions come from :mod:`mayfly.semconv`
(re-exported here); Mayfly's own names start with ``mayfly.``.
"""

from __future__ import annotations

from typing import Final

from mayfly.semconv import (
    CE_EVENT_ID,
    CE_EVENT_SOURCE,
    CE_EVENT_TYPE,
    CE_SPEC_VERSION,
    ERROR_TYPE,
    MESSAGING_CONSUMER_GROUP,
    MESSAGING_DESTINATION,
    MESSAGING_KAFKA_KEY,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_NAME,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
    OPERATION_PROCESS,
    OPERATION_SEND,
    SERVER_ADDRESS,
    SERVER_PORT,
)

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
    "ERROR_TYPE",
    "LOG_ATTEMPT",
    "LOG_LEVEL",
    "LOG_MESSAGE",
    "MESSAGING_CONSUMER_GROUP",
    "MESSAGING_DESTINATION",
    "MESSAGING_KAFKA_KEY",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "OPERATION_PROCESS",
    "OPERATION_SEND",
    "PACKAGE_DIGEST",
    "PACKAGE_VERSION",
    "PROGRESS_PERCENT",
    "REJECTED_STATUS",
    "REJECTION_CODE",
    "REJECTION_FIELD",
    "REQUEST_ID",
    "REQUEST_STATUS",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "TASK",
]

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
