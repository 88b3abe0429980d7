"""Waiting for the outcomes of published requests: ``mayfly publish --wait``.

The results topic is the record of what happened: a result (in parts when it
is large, one per shard when the request was cut), or a rejection. This reads
it with a group of its own from the beginning, puts parts and shards back
together, and tells each request's outcome once as it completes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mayfly.coordinator.pipeline import exit_code_for
from mayfly.errors import EventError
from mayfly.eventlog import EventLog
from mayfly.events import (
    SHARD_MARK,
    TaskCompleted,
    TaskRejected,
    from_kafka,
    merge_completed,
    merge_shards,
    shard_prefixes,
)
from mayfly.exitcodes import ExitCode
from mayfly.topics import Topics

__all__ = ["Waited", "wait_for_outcomes"]

Outcome = TaskCompleted | TaskRejected


@dataclass
class Waited:
    """What the wait found: each request's outcome, and the ids still without one."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """Job mode's code for the worst outcome (rejected, failed, partial, ok)."""
        codes = [exit_code_for(o) for o in self.outcomes.values()]
        order = [ExitCode.OK, ExitCode.PARTIAL, ExitCode.FAILED, ExitCode.REJECTED]
        return max(codes, key=order.index, default=ExitCode.OK)


def wait_for_outcomes(
    log: EventLog,
    topics: Topics,
    request_ids: Iterable[str],
    timeout_s: float,
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
) -> Waited:
    """Read the results topic until every request in ``request_ids`` has an
    outcome or ``timeout_s`` passes; ``on_outcome`` is told each as it completes."""
    wanted = set(request_ids)
    # A shard's rejection names only the shard's id: its prefix leads back.
    by_prefix = {prefix: rid for rid in wanted for prefix in shard_prefixes(rid)}
    waited = Waited()
    parts: dict[str, dict[int, TaskCompleted]] = {}
    shards: dict[str, dict[int, TaskCompleted]] = {}
    consumer = log.consumer(f"mayfly-publish-wait-{uuid.uuid4().hex[:12]}", topics.results)
    deadline = time.monotonic() + timeout_s
    try:
        while wanted - waited.outcomes.keys() and time.monotonic() < deadline:
            left = max(0.0, min(1.0, deadline - time.monotonic()))
            for record in consumer.poll(500, left):
                try:
                    event = from_kafka(record.headers, record.key, record.value)
                except EventError:
                    continue  # not for us to judge: the aggregator dead-letters it
                if not isinstance(event, TaskCompleted | TaskRejected):
                    continue
                root = _root(event, wanted, by_prefix)
                if root is None or root in waited.outcomes:
                    continue
                outcome = _collect(event, root, parts, shards)
                if outcome is not None:
                    waited.outcomes[root] = outcome
                    on_outcome(outcome)
    finally:
        consumer.close()
    waited.missing = sorted(wanted - waited.outcomes.keys())
    return waited


def _root(event: Outcome, wanted: set[str], by_prefix: dict[str, str]) -> str | None:
    """The published request ``event`` is about, if it is one waited for."""
    if isinstance(event, TaskCompleted):
        root = event.root_id
        return root if root in wanted else None
    rid = str(event.request_id)
    if rid in wanted:
        return rid
    mark = rid.rfind(SHARD_MARK)
    return by_prefix.get(rid[: mark + len(SHARD_MARK)]) if mark >= 0 else None


def _collect(
    event: Outcome,
    root: str,
    parts: dict[str, dict[int, TaskCompleted]],
    shards: dict[str, dict[int, TaskCompleted]],
) -> Outcome | None:
    """The request's outcome once ``event`` completes it; None while parts or shards are missing."""
    if isinstance(event, TaskRejected):
        return event  # a shard's rejection leaves its request without a whole result
    got = parts.setdefault(str(event.request_id), {})
    got[event.part.index] = event  # a redelivered part counts once
    if len(got) < event.part.count:
        return None
    whole = merge_completed(got.values())
    if whole.shard is None:
        return whole
    cut = shards.setdefault(root, {})
    cut[whole.shard.index] = whole
    if len(cut) < whole.shard.count:
        return None
    return merge_shards(cut.values())
