"""What a coordinator's reports on one request share: a result, a progress report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from mayfly.errors import EventError

if TYPE_CHECKING:
    from mayfly.events.requested import Shard

__all__ = ["ReportOfRequest"]


class ReportOfRequest:
    """Mixed into an :class:`~mayfly.events._base.EventModel` with ``request_id``,
    ``task``, ``shard`` and an ``id`` derived from them: every report of a
    request (a shard's: of its request) goes on its partition, in order."""

    #: What the model is called in an id error ("result", "report").
    report_name: ClassVar[str]

    if TYPE_CHECKING:
        request_id: str
        task: str
        shard: Shard | None

        @property
        def id(self) -> str: ...

    @property
    def root_id(self) -> str:
        """The id of the request as published: a shard's ``of``, else ``request_id``."""
        return self.shard.of if self.shard is not None else self.request_id

    @property
    def partition_key(self) -> str:
        """The request id (a shard's: its request's): the reports of one request
        stay on one partition, in order, so one reader sees them all."""
        return self.root_id

    @property
    def tasktype(self) -> str:
        """The ``tasktype`` extension, carried from the request."""
        return self.task

    def _ce_id(self) -> str:
        return self.id

    def _ce_partition_key(self) -> str:
        return self.root_id

    def _ce_tasktype(self) -> str:
        return self.task

    def _check_attributes(self, attributes: Mapping[str, Any]) -> None:
        super()._check_attributes(attributes)  # type: ignore[misc]
        event_id = attributes.get("id")
        if event_id != self.id:
            raise EventError(
                "id", f"{event_id!r} should be {self.id!r} for this {self.report_name}"
            )
