"""Where a consumer group stands in one partition: a leaf value type.

Shared by the event log port (members commit and read positions) and the
runtime's pure policies (which compute them), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Position"]


@dataclass(frozen=True)
class Position:
    """How far a group got in one partition: where a member taking it over starts.

    ``offset`` is the next record to read (what Kafka calls the committed
    offset). Records finish out of order, so some after it may be done
    already: every record in ``[offset, done_until)`` not in ``pending`` is,
    and a member taking the partition over passes over those instead of
    running them again.
    """

    offset: int
    done_until: int = 0
    pending: frozenset[int] = field(default_factory=frozenset)

    def is_done(self, offset: int) -> bool:
        """Whether the record at ``offset`` was finished by a member before."""
        return self.offset <= offset < self.done_until and offset not in self.pending
