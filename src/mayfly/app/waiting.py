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
from mayfly.events import TaskCompleted, TaskRejected, from_kafka, merge_completed, merge_shards
from mayfly.exitcodes import ExitCode
from mayfly.topics import Topics

__all__ = ["Waited", "wait_for_outcomes"]

Outcome = TaskCompleted | TaskRejected
_SHARD = "#shard-"


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
                outcome = _collect(event, wanted, waited.outcomes, parts, shards)
                if outcome is not None:
                    waited.outcomes[_root(outcome)] = outcome
                    on_outcome(outcome)
    finally:
        consumer.close()
    waited.missing = sorted(wanted - waited.outcomes.keys())
    return waited


def _root(event: Outcome) -> str:
    rid = str(event.request_id)
    return rid.split(_SHARD, 1)[0] if _SHARD in rid else rid


def _collect(
    event: object,
    wanted: set[str],
    done: dict[str, Outcome],
    parts: dict[str, dict[int, TaskCompleted]],
    shards: dict[str, dict[int, TaskCompleted]],
) -> Outcome | None:
    if not isinstance(event, TaskCompleted | TaskRejected):
        return None
    root = _root(event)
    if root not in wanted or root in done:
        return None
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
