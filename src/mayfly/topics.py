"""Topic names: the one definition of every topic a Mayfly installation uses.

A leaf module (it imports only the event contract's priorities), so the event
log, the runtime, sinks, the aggregator and the CLI all name topics the same
way, under one prefix (``MAYFLY_TOPIC_PREFIX``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mayfly.events import Priority

__all__ = ["DEFAULT_PREFIX", "Topics", "installation_of"]

DEFAULT_PREFIX = "mayfly"


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix, so several Mayfly installations, or test
    runs, can share one Kafka cluster."""

    prefix: str = DEFAULT_PREFIX

    def lane(self, priority: Priority | str) -> str:
        """The lane (topic) a request of this priority is published to."""
        return f"{self.prefix}.requests.{Priority(priority).value}"

    def lanes(self) -> list[str]:
        """Every request lane, highest priority first."""
        return [self.lane(p) for p in Priority]

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def control(self) -> str:
        """Cancels (``dev.mayfly.task.cancel``): every runtime reads all of it."""
        return f"{self.prefix}.control"

    @property
    def deferred(self) -> str:
        """Requests their schedule holds, on Knative: a waker function moves
        each back to its lane once due (:mod:`mayfly.runtime.deferred`)."""
        return f"{self.prefix}.deferred"

    def all(self) -> list[str]:
        return [*self.lanes(), self.results, self.dead_letter, self.control, self.deferred]

    @property
    def dispatcher_group(self) -> str:
        """The consumer group of the installation's dispatchers (one per runtime):
        per installation, so a runtime joining one rebalances no other."""
        return f"{self.prefix}-dispatcher"

    @property
    def aggregator_group(self) -> str:
        """The consumer group of the installation's aggregators."""
        return f"{self.prefix}-aggregator"


def installation_of(topic: str) -> Topics | None:
    """The installation whose topic ``topic`` is, or ``None`` for a foreign topic."""
    marker = ".requests." if ".requests." in topic else "."
    prefix = topic.rpartition(marker)[0]
    if not prefix:
        return None
    topics = Topics(prefix)
    return topics if topic in topics.all() else None
