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
from mayfly.events import TaskCompleted, TaskRejected, from_kafka, shard_prefixes
from mayfly.exitcodes import ExitCode
from mayfly.topics import Topics
from mayfly.tracking import Outcome, OutcomeCollector, root_of

__all__ = ["Waited", "wait_for_outcomes"]


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
    by_prefix = {prefix: rid for rid in wanted for prefix in shard_prefixes(rid)}
    waited = Waited()
    collector = OutcomeCollector()
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
                root = root_of(event, by_prefix)
                if root not in wanted or root in waited.outcomes:
                    continue
                outcome = collector.add(event, root)
                if outcome is not None:
                    waited.outcomes[root] = outcome
                    on_outcome(outcome)
    finally:
        consumer.close()
    waited.missing = sorted(wanted - waited.outcomes.keys())
    return waited
