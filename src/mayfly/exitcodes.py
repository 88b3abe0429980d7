"""How a coordinator process ends: the one durability signal.

Job mode exits with these codes, the local runtime's dispatcher reads them
from the coordinator processes it forked, and the JobSink render lists the
ones Kubernetes must not retry. Which codes mean "the result is durable" is
decided here, once.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    """Exit status of one coordinator run."""

    OK = 0
    """Every device succeeded (or the event was not a request: nothing to run)."""
    INTERNAL = 1
    """The coordinator crashed; nothing was delivered."""
    CONFIG = 2
    """Bad configuration; the request was not looked at."""
    PARTIAL = 3
    """Some devices failed; the result was delivered."""
    FAILED = 4
    """No device succeeded (or the request was canceled); the result was delivered."""
    REJECTED = 5
    """The request could not run; the rejection was delivered."""
    UNDELIVERED = 6
    """The request ran but its result could not be made durable."""
    DEFERRED = 7
    """The request's schedule holds it (closed now): nothing was delivered; run
    it again when the schedule opens (the runtime holds its record until then)."""

    @property
    def result_durable(self) -> bool:
        """The outcome (result or rejection) is durable: the request is done."""
        return self in _DURABLE

    @property
    def final(self) -> bool:
        """Running the same request again cannot end differently: do not retry.

        A crash or an undelivered result is worth another attempt; a bad
        configuration, like a delivered outcome, is not.
        """
        return self is not ExitCode.OK and self not in _RETRYABLE

    @classmethod
    def durable_codes(cls) -> frozenset[int]:
        return frozenset(int(c) for c in _DURABLE)

    @classmethod
    def final_failure_codes(cls) -> list[int]:
        """Non-zero codes after which a Job must fail rather than run again."""
        return [int(c) for c in cls if c.final]


_DURABLE = frozenset({ExitCode.OK, ExitCode.PARTIAL, ExitCode.FAILED, ExitCode.REJECTED})
_RETRYABLE = frozenset({ExitCode.INTERNAL, ExitCode.UNDELIVERED, ExitCode.DEFERRED})
