"""The cancels a runtime has read: which requests must not start, or must stop.

Pure bookkeeping for the dispatcher, which reads every cancel on the control
topic from its beginning when it starts (a cancel published while no runtime
ran still holds) and as they come. A cancel names the request as published; a
shard of it (``<id>#shard-<n>``, or the shortened form of a long id) is
canceled with it.
"""

from __future__ import annotations

import collections

from mayfly.events import SHARD_MARK, TaskCancel, shard_prefixes

__all__ = ["MAX_CANCELS", "CancelBook"]

#: Cancels kept at most, the oldest forgotten first: a request canceled that
#: long ago has long ended, or been started and stopped.
MAX_CANCELS = 10_000


class CancelBook:
    """The cancels read so far, by the request they name."""

    def __init__(self, limit: int = MAX_CANCELS) -> None:
        self._limit = limit
        self._by_id: collections.OrderedDict[str, TaskCancel] = collections.OrderedDict()
        self._by_prefix: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, cancel: TaskCancel) -> bool:
        """Keep ``cancel``; whether it is news (the first for its request)."""
        if cancel.request_id in self._by_id:
            return False
        self._by_id[cancel.request_id] = cancel
        for prefix in shard_prefixes(cancel.request_id):
            self._by_prefix[prefix] = cancel.request_id
        while len(self._by_id) > self._limit:
            old, _ = self._by_id.popitem(last=False)
            for prefix in shard_prefixes(old):
                if self._by_prefix.get(prefix) == old:
                    del self._by_prefix[prefix]
        return True

    def of(self, request_id: str) -> TaskCancel | None:
        """The cancel of ``request_id``, or of the request it is a shard of."""
        found = self._by_id.get(request_id)
        if found is None and SHARD_MARK in request_id:
            head = request_id.rpartition(SHARD_MARK)[0] + SHARD_MARK
            root = self._by_prefix.get(head)
            found = self._by_id.get(root) if root is not None else None
        return found
