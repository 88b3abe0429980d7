"""LogControl: the cancels of a request with no runtime beside it, read from
the control topic of a log (here the embedded one; Kafka's in
test_standalone_log.py)."""

from __future__ import annotations

import select
import time
from pathlib import Path

from mayfly.app.installation import LogControl
from mayfly.coordinator.sinks import EventLogSink
from mayfly.eventlog.sqlite import SqliteEventLog
from mayfly.events import TaskCancel, new_request, shard_request
from mayfly.topics import Topics


def _readable(control: LogControl, timeout_s: float) -> bool:
    """The run would wake: its pipe readable, or the cancel already heard
    (then there is no descriptor to wait on, and the run sees it at its next
    look)."""
    fd = control.fileno()
    if fd is None:
        return control.canceled() is not None
    return bool(select.select([fd], [], [], timeout_s)[0]) or control.canceled() is not None


def test_a_cancel_of_the_request_wakes_the_run_with_its_grace(tmp_path: Path) -> None:
    topics = Topics()
    with SqliteEventLog(tmp_path / "log.db") as log:
        request = new_request("reboot", devices=["d1"])
        other = new_request("reboot", devices=["d2"])
        sink = EventLogSink(log, topics)
        with LogControl(log, topics.control, request, every_s=0.05) as control:
            sink.emit(TaskCancel.of(other.id, 1.0, "not this one"))
            assert not _readable(control, 0.3)
            assert control.canceled() is None
            sink.emit(TaskCancel.of(request.id, 4.0, "wrong config"))
            assert _readable(control, 5)
            control.read()
            assert control.canceled() == 4.0
            assert control.fileno() is None  # nothing more to hear
            assert control.aborted() is None
        assert control.fileno() is None


def test_a_sibling_shards_abort_reaches_a_shard_as_its_abort(tmp_path: Path) -> None:
    topics = Topics()
    with SqliteEventLog(tmp_path / "log.db") as log:
        request = new_request("reboot", devices=[f"d{n}" for n in range(4)])
        first, second = shard_request(request, request.devices, 2, version="1.0.0")
        # Published before the shard started: it is read from the request's time.
        EventLogSink(log, topics).emit(
            TaskCancel.of(request.id, 0.0, "shard 1 of 2 aborted: 3 failed", abort=True)
        )
        started = time.monotonic()
        with LogControl(log, topics.control, second, every_s=5) as control:
            assert _readable(control, 5)
            assert time.monotonic() - started < 2  # the first look is at once
            assert control.canceled() == 0.0
            assert control.aborted() == "shard 1 of 2 aborted: 3 failed"
        assert first.shard is not None
        assert first.shard.of == request.id
