"""The event contract: every Mayfly event type, its schema and its encodings.

Five CloudEvents 1.0 types, JSON data, one frozen pydantic model each::

    dev.mayfly.task.requested   TaskRequest    operator -> coordinator
    dev.mayfly.task.completed   TaskCompleted  coordinator -> aggregator (maybe in parts)
    dev.mayfly.task.rejected    TaskRejected   coordinator -> dead-letter topic
    dev.mayfly.task.progress    TaskProgress   coordinator -> results topic, while it runs
    dev.mayfly.task.cancel      TaskCancel     operator -> control topic, read by every runtime

Encodings are symmetric functions: :func:`to_cloudevent`/:func:`from_cloudevent`,
:func:`to_kafka`/:func:`from_kafka`, :func:`to_http`/:func:`from_http`. Bad
input raises one error type, :class:`mayfly.errors.EventError`, whose
``field`` is the wire name at fault (``priority``, ``data.devices``...).
A consumer that cannot decode a message still answers it::

    try:
        event = from_kafka(record)
    except EventError as error:
        publish(to_kafka(rejection_for(error, peek_attributes(record))))
"""

from __future__ import annotations

from mayfly.events._base import (
    COORDINATOR_SOURCE,
    JSON_CONTENT_TYPE,
    MAX_EVENT_BYTES,
    PUBLISHER_SOURCE,
    SPECVERSION,
    TASK_CANCEL,
    TASK_COMPLETED,
    TASK_PROGRESS,
    TASK_REJECTED,
    TASK_REQUESTED,
    DeviceStatus,
    OverallStatus,
    Priority,
    is_valid_traceparent,
)
from mayfly.events.cancel import (
    DEFAULT_CANCEL_GRACE_S,
    MAX_CANCEL_GRACE_S,
    MAX_CANCEL_REASON,
    TaskCancel,
)
from mayfly.events.codec import (
    STRUCTURED_CONTENT_TYPE,
    KafkaRecord,
    MayflyEvent,
    Mode,
    from_cloudevent,
    from_http,
    from_kafka,
    peek_attributes,
    to_cloudevent,
    to_http,
    to_kafka,
    to_kafka_record,
)
from mayfly.events.completed import (
    DEFAULT_PART_BYTES,
    MAX_DEVICE_LOG_LINES,
    MAX_LOG_MESSAGE,
    CoordinatorInfo,
    DeviceResult,
    LogLine,
    PackageRef,
    Part,
    ShardRun,
    TaskCompleted,
    Timings,
    merge_completed,
    merge_shards,
    split_completed,
)
from mayfly.events.progress import (
    MAX_CHECKPOINT_BYTES,
    MAX_PROGRESS_DEVICES,
    MAX_PROGRESS_LINES,
    MAX_PROGRESS_MESSAGE,
    DeviceLine,
    DeviceUpdate,
    TaskProgress,
)
from mayfly.events.rejected import RejectionCode, TaskRejected, rejection_for
from mayfly.events.requested import (
    DEFAULT_CHANNEL,
    MAX_SHARDS,
    MAX_WAVES,
    SHARD_MARK,
    Abort,
    Continuous,
    Ramp,
    Rollback,
    Rollout,
    Schedule,
    Shard,
    TaskRequest,
    Window,
    new_request,
    partition_key_for,
    rollback_requests,
    shard_prefixes,
    shard_request,
)

__all__ = [
    "COORDINATOR_SOURCE",
    "DEFAULT_CANCEL_GRACE_S",
    "DEFAULT_CHANNEL",
    "DEFAULT_PART_BYTES",
    "JSON_CONTENT_TYPE",
    "MAX_CANCEL_GRACE_S",
    "MAX_CANCEL_REASON",
    "MAX_CHECKPOINT_BYTES",
    "MAX_DEVICE_LOG_LINES",
    "MAX_EVENT_BYTES",
    "MAX_LOG_MESSAGE",
    "MAX_PROGRESS_DEVICES",
    "MAX_PROGRESS_LINES",
    "MAX_PROGRESS_MESSAGE",
    "MAX_SHARDS",
    "MAX_WAVES",
    "PUBLISHER_SOURCE",
    "SHARD_MARK",
    "SPECVERSION",
    "STRUCTURED_CONTENT_TYPE",
    "TASK_CANCEL",
    "TASK_COMPLETED",
    "TASK_PROGRESS",
    "TASK_REJECTED",
    "TASK_REQUESTED",
    "Abort",
    "Continuous",
    "CoordinatorInfo",
    "DeviceLine",
    "DeviceResult",
    "DeviceStatus",
    "DeviceUpdate",
    "KafkaRecord",
    "LogLine",
    "MayflyEvent",
    "Mode",
    "OverallStatus",
    "PackageRef",
    "Part",
    "Priority",
    "Ramp",
    "RejectionCode",
    "Rollback",
    "Rollout",
    "Schedule",
    "Shard",
    "ShardRun",
    "TaskCancel",
    "TaskCompleted",
    "TaskProgress",
    "TaskRejected",
    "TaskRequest",
    "Timings",
    "Window",
    "from_cloudevent",
    "from_http",
    "from_kafka",
    "is_valid_traceparent",
    "merge_completed",
    "merge_shards",
    "new_request",
    "partition_key_for",
    "peek_attributes",
    "rejection_for",
    "rollback_requests",
    "shard_prefixes",
    "shard_request",
    "split_completed",
    "to_cloudevent",
    "to_http",
    "to_kafka",
    "to_kafka_record",
]
