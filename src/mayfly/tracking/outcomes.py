"""Putting a request's outcome back together from the results topic.

A request's outcome reaches the results topic as a rejection, or as a
result in parts when it is large, one result per shard when the request was
cut. :class:`OutcomeCollector` takes those events in any order, with
redeliveries, and says once when a request's outcome is whole. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mayfly.errors import EventError
from mayfly.events import (
    SHARD_MARK,
    TaskCompleted,
    TaskRejected,
    merge_completed,
    merge_shards,
)

__all__ = ["Outcome", "OutcomeCollector", "root_of"]

Outcome = TaskCompleted | TaskRejected


def root_of(event: Outcome, by_prefix: Mapping[str, str]) -> str | None:
    """The id of the request as published that ``event`` is the outcome of.

    A shard's rejection names only the shard's id: ``by_prefix`` (from
    :func:`~mayfly.events.shard_prefixes` of the requests known) leads it back,
    else the id before the shard mark (right unless the id was shortened).
    ``None`` for a rejection of an input without a usable id.
    """
    if isinstance(event, TaskCompleted):
        return event.root_id
    rid = event.request_id
    if rid is None:
        return None
    mark = rid.rfind(SHARD_MARK)
    if mark < 0:
        return rid
    prefix = rid[: mark + len(SHARD_MARK)]
    return by_prefix.get(prefix, rid[:mark])


@dataclass
class OutcomeCollector:
    """Parts and shards seen so far, per request, until its outcome is whole."""

    _parts: dict[str, dict[int, TaskCompleted]] = field(default_factory=dict)
    _shards: dict[str, dict[int, TaskCompleted]] = field(default_factory=dict)

    def add(self, event: Outcome, root: str) -> Outcome | None:
        """Take one event of request ``root``'s outcome: the outcome once this
        event completes it, else None (parts or shards still missing, or parts
        that do not fit together, which the aggregator dead-letters)."""
        if isinstance(event, TaskRejected):
            return event  # a shard's rejection leaves its request without a whole result
        got = self._parts.setdefault(event.request_id, {})
        got[event.part.index] = event  # a redelivered part counts once
        if len(got) < event.part.count:
            return None
        del self._parts[event.request_id]
        try:
            whole = merge_completed(got.values())
        except EventError:
            return None
        if whole.shard is None:
            return whole
        cut = self._shards.setdefault(root, {})
        cut[whole.shard.index] = whole
        if len(cut) < whole.shard.count:
            return None
        del self._shards[root]
        try:
            return merge_shards(cut.values())
        except EventError:
            return None

    def waiting(self, root: str) -> int:
        """How many shards of ``root`` have a whole result so far."""
        return len(self._shards.get(root, {}))
