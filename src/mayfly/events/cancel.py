"""``dev.mayfly.task.cancel``: an operator asks a request to stop.

``mayfly cancel`` publishes it on the installation's control topic, which
every runtime reads whole (no group shares it out): the runtime holding the
request acts on it, whether the request waits in its lanes (it never
starts; its outcome is a ``canceled`` rejection) or runs in one of its
coordinators (queued devices are skipped, running attempts get
``grace_s`` to end on their own, then are killed); a runtime that reads the
request only later never starts it. A cancel of a request that already
ended changes nothing.
"""

from __future__ import annotations

import uuid
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints

from mayfly.events._base import (
    PUBLISHER_SOURCE,
    TASK_CANCEL,
    EventId,
    EventModel,
    NonEmpty,
    validate_model,
)

__all__ = ["DEFAULT_CANCEL_GRACE_S", "MAX_CANCEL_GRACE_S", "MAX_CANCEL_REASON", "TaskCancel"]

#: How long running attempts get to end on their own, unless the cancel says.
DEFAULT_CANCEL_GRACE_S = 10.0
#: The longest grace period a cancel may ask for.
MAX_CANCEL_GRACE_S = 3600.0
#: A cancel's reason is cut to this many characters.
MAX_CANCEL_REASON = 200


def _new_id() -> str:
    return str(uuid.uuid4())


class TaskCancel(EventModel):
    """A cancel of one request (of all of it, when it was cut into shards)."""

    event_type: ClassVar[str] = TASK_CANCEL
    attribute_fields: ClassVar[dict[str, str]] = {
        "id": "id",
        "source": "source",
        "time": "time",
        "priority": "priority",
        "traceparent": "traceparent",
        "tracestate": "tracestate",
    }

    id: EventId = Field(default_factory=_new_id)
    source: NonEmpty = PUBLISHER_SOURCE
    request_id: EventId
    """The id of the request as published."""
    grace_s: Annotated[float, Field(ge=0.0, le=MAX_CANCEL_GRACE_S, allow_inf_nan=False)] = (
        DEFAULT_CANCEL_GRACE_S
    )
    reason: Annotated[str, StringConstraints(max_length=MAX_CANCEL_REASON)] = ""
    abort: bool = Field(default=False, exclude_if=lambda v: not v)
    """The rollout aborted (in one of its shards, which says so): the shards it
    reaches end aborted too, and roll back the devices they changed."""

    @classmethod
    def of(
        cls,
        request_id: str,
        grace_s: float = DEFAULT_CANCEL_GRACE_S,
        reason: str = "",
        *,
        abort: bool = False,
    ) -> TaskCancel:
        """A new cancel of ``request_id``.

        Raises:
            EventError: naming the field that breaks the contract.
        """
        return validate_model(
            cls, {"request_id": request_id, "grace_s": grace_s, "reason": reason, "abort": abort}
        )

    @property
    def partition_key(self) -> str:
        return self.request_id

    def _ce_id(self) -> str:
        return self.id

    def _ce_partition_key(self) -> str:
        return self.request_id

    def _ce_tasktype(self) -> str | None:
        return None
