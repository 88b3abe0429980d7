"""The OpenTelemetry semantic conventions Mayfly's spans follow, in one place.

From ``opentelemetry-semantic-conventions``: the messaging and CloudEvents
ones are still in its incubating modules, imported here only, so a move of
theirs is one edit. A leaf module: the publisher (event log) and the
aggregator both name their attributes from it.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv._incubating.attributes import cloudevents_attributes as _ce
from opentelemetry.semconv._incubating.attributes import messaging_attributes as _messaging
from opentelemetry.semconv.attributes import error_attributes as _error
from opentelemetry.semconv.attributes import server_attributes as _server

__all__ = [
    "CE_EVENT_ID",
    "CE_EVENT_SOURCE",
    "CE_EVENT_TYPE",
    "CE_SPEC_VERSION",
    "ERROR_TYPE",
    "MESSAGING_CONSUMER_GROUP",
    "MESSAGING_DESTINATION",
    "MESSAGING_KAFKA_KEY",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "OPERATION_PROCESS",
    "OPERATION_SEND",
    "SERVER_ADDRESS",
    "SERVER_PORT",
]

CE_EVENT_ID: Final = _ce.CLOUDEVENTS_EVENT_ID
CE_EVENT_TYPE: Final = _ce.CLOUDEVENTS_EVENT_TYPE
CE_EVENT_SOURCE: Final = _ce.CLOUDEVENTS_EVENT_SOURCE
CE_SPEC_VERSION: Final = _ce.CLOUDEVENTS_EVENT_SPEC_VERSION
MESSAGING_SYSTEM: Final = _messaging.MESSAGING_SYSTEM
MESSAGING_DESTINATION: Final = _messaging.MESSAGING_DESTINATION_NAME
MESSAGING_OPERATION_TYPE: Final = _messaging.MESSAGING_OPERATION_TYPE
MESSAGING_OPERATION_NAME: Final = _messaging.MESSAGING_OPERATION_NAME
MESSAGING_MESSAGE_ID: Final = _messaging.MESSAGING_MESSAGE_ID
MESSAGING_CONSUMER_GROUP: Final = _messaging.MESSAGING_CONSUMER_GROUP_NAME
MESSAGING_KAFKA_KEY: Final = _messaging.MESSAGING_KAFKA_MESSAGE_KEY
#: ``messaging.operation.type`` of a publisher's span, and of a coordinator's
#: processing of the request (the aggregator's root span of a trace).
OPERATION_SEND: Final = _messaging.MessagingOperationTypeValues.SEND.value
OPERATION_PROCESS: Final = _messaging.MessagingOperationTypeValues.PROCESS.value
ERROR_TYPE: Final = _error.ERROR_TYPE
SERVER_ADDRESS: Final = _server.SERVER_ADDRESS
SERVER_PORT: Final = _server.SERVER_PORT
