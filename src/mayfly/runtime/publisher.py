"""Publishing task requests onto their priority lane of the event log."""

from __future__ import annotations

from mayfly.events import TaskRequest, to_kafka_record
from mayfly.runtime.eventlog import EventLog, request_topic

__all__ = ["publish_request"]


def publish_request(log: EventLog, request: TaskRequest) -> str:
    """Append a request (Kafka binary mode, keyed by partition key) to its lane.

    Returns:
        The topic it went to.
    """
    topic = request_topic(request.priority)
    key, value, headers = to_kafka_record(request)
    log.append(topic, key, value, headers)
    return topic
