"""The runtime's appender: coordinators' results made durable by one long-lived log client.

A thread of the runtime takes what coordinators hand over
(:mod:`mayfly.runtime.session`), appends it to the event log and only then
answers each coordinator. What arrives while an append is under way is
appended next, all of it at once, so a burst of results costs a few appends
rather than a connection per coordinator. The dispatcher's loop never waits
on the log for a result.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from mayfly.eventlog import EventLog
from mayfly.runtime.session import Append

__all__ = ["Appender"]

_LOG = logging.getLogger("mayfly.runtime.appender")

#: Called once the records are durable (``None``) or refused (the reason).
Answer = Callable[[str | None], None]


class Appender:
    """Appends batches of records on its own thread, answering each batch."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._queue: queue.SimpleQueue[tuple[Sequence[Append], Answer] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mayfly-appender", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Append], answer: Answer) -> None:
        """Append ``records`` (in order) soon; ``answer`` is called from the
        appender's thread once they are durable, or with why they are not."""
        self._queue.put((records, answer))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._append(batch)
                except Exception:  # never the end of the thread every result waits on
                    _LOG.exception("a batch of %d appends failed", len(batch))
            if item is None:
                return

    def _append(self, batch: list[tuple[Sequence[Append], Answer]]) -> None:
        """One append of everything waiting. A record the log refuses for what it
        holds fails only its own submission (each is tried on its own); a log
        that does not answer fails the batch at once, rather than once per
        submission."""
        try:
            self._log.append_many([r for records, _ in batch for r in records])
        except (TypeError, ValueError) as exc:
            if len(batch) > 1:
                for one in batch:
                    self._append([one])
                return
            _answer(batch[0][1], f"{self._log.describe()} refused the result: {exc}")
            return
        except Exception as exc:
            # The coordinators' sinks raise this (their requests are then retried).
            _LOG.warning("%d result(s) not appended: %s", len(batch), exc)
            for _, answer in batch:
                _answer(answer, f"{self._log.describe()} did not take the result: {exc}")
            return
        for _, answer in batch:
            _answer(answer, None)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish what was submitted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)


def _answer(answer: Answer, why: str | None) -> None:
    try:
        answer(why)
    except Exception:  # a coordinator gone mid-answer: its exit is handled elsewhere
        _LOG.exception("an append could not be answered")
