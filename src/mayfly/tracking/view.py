"""The request view: what became of each published request, folded from the log.

Every runtime, and every reader, can rebuild it from the log alone: the
request lanes say what was asked and when, the results topic what happened,
the control topic which were asked to stop.
Nothing is kept beside the log, so the view is the same after a restart and
whichever runtime ran the request. No I/O: :mod:`mayfly.app.tracking` reads
the log and feeds :meth:`RequestBook.add`.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from mayfly.aggregator.tracing import trace_id_of
from mayfly.events import (
    DeviceLine,
    DeviceResult,
    DeviceUpdate,
    MayflyEvent,
    RejectionCode,
    TaskCancel,
    TaskCompleted,
    TaskProgress,
    TaskRejected,
    TaskRequest,
    shard_prefixes,
)
from mayfly.tracking.outcomes import Outcome, OutcomeCollector, root_of

__all__ = ["RECENT_LINES", "RequestBook", "RequestState", "RequestView", "trace_url"]

#: Package lines a running request's view keeps, the latest.
RECENT_LINES = 100


class RequestState(StrEnum):
    """Where a request stands, as the log tells it."""

    PENDING = "pending"
    """Published; not running yet, as far as the log tells (or too briefly to say)."""
    RUNNING = "running"
    """A coordinator reported progress; no outcome yet."""
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"


@dataclass
class RequestView:
    """One published request and, once it has one, its outcome."""

    id: str
    request: TaskRequest | None = None
    """As published; None when the log kept only its outcome."""
    outcome: Outcome | None = None
    shards: int = 0
    """Shards the request was cut into (0: it ran whole)."""
    shards_done: int = 0
    device_counts: Counter[str] = field(default_factory=Counter)
    """Devices per status in the outcome (kept when the devices are not)."""
    progress: dict[str, TaskProgress] = field(default_factory=dict)
    """While it runs: the latest report of the request, or of each shard, by id."""
    live: dict[str, DeviceUpdate] = field(default_factory=dict)
    """While it runs: the latest word of each device a report named."""
    lines: deque[DeviceLine] = field(default_factory=lambda: deque(maxlen=RECENT_LINES))
    """While it runs: the package's latest lines, as reports brought them."""
    lines_seen: int = 0
    """Lines reports brought so far (more than :attr:`lines` keeps)."""
    cancel: TaskCancel | None = None
    """The first cancel asked of it (``mayfly cancel``), if any."""

    @property
    def state(self) -> RequestState:
        if isinstance(self.outcome, TaskRejected):
            if self.outcome.code is RejectionCode.CANCELED:
                return RequestState.CANCELED  # before it started
            return RequestState.REJECTED
        if isinstance(self.outcome, TaskCompleted):
            return RequestState(self.outcome.status.value)
        return RequestState.RUNNING if self.progress else RequestState.PENDING

    @property
    def running_counts(self) -> Counter[str]:
        """While it runs: devices per status, summed over the reports of its shards."""
        counts: Counter[str] = Counter()
        for report in self.progress.values():
            counts.update({status.value: n for status, n in report.counts.items()})
        return counts

    @property
    def running_since(self) -> datetime | None:
        return min((r.started_at for r in self.progress.values()), default=None)

    @property
    def task(self) -> str | None:
        if self.request is not None:
            return self.request.task
        return self.outcome.task if self.outcome is not None else None

    @property
    def priority(self) -> str | None:
        if self.request is not None:
            return self.request.priority.value
        return self.outcome.priority.value if self.outcome is not None else None

    @property
    def published_at(self) -> datetime | None:
        """When it was published: the request's time, else what its outcome says."""
        if self.request is not None:
            return self.request.time
        if isinstance(self.outcome, TaskCompleted):
            return self.outcome.timings.published_at or self.outcome.timings.received_at
        return self.outcome.time if self.outcome is not None else None

    @property
    def finished_at(self) -> datetime | None:
        if isinstance(self.outcome, TaskCompleted):
            return self.outcome.timings.finished_at
        return self.outcome.time if self.outcome is not None else None

    @property
    def version(self) -> str | None:
        """The package version that ran, else the one asked for."""
        if isinstance(self.outcome, TaskCompleted):
            return self.outcome.package.version
        return self.request.version if self.request is not None else None

    @property
    def device_total(self) -> int | None:
        """Devices it ran on, else named (a selector's are known once it ran)."""
        if self.device_counts:
            return sum(self.device_counts.values())
        if self.request is not None and self.request.selector and self.progress:
            return sum(r.devices_total for r in self.progress.values())
        if self.request is not None and not self.request.selector:
            return len(self.request.devices)
        return None

    @property
    def devices(self) -> tuple[DeviceResult, ...]:
        return self.outcome.devices if isinstance(self.outcome, TaskCompleted) else ()

    @property
    def trace_id(self) -> str | None:
        """The trace the aggregator makes of it (the publisher's when it started one)."""
        if self.outcome is not None:
            return trace_id_of(self.outcome)
        parent = self.request.traceparent if self.request is not None else None
        return parent.split("-")[1] if parent else None

    def to_dict(self, *, jaeger_url: str | None = None) -> dict[str, Any]:
        """Everything known, JSON-ready: the request and outcome as their events' data."""
        trace_id = self.trace_id
        body: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "priority": self.priority,
            "state": self.state.value,
            "published_at": _iso(self.published_at),
            "finished_at": _iso(self.finished_at),
            "version": self.version,
            "devices": dict(sorted(self.device_counts.items())),
            "shards": self.shards,
            "trace_id": trace_id,
        }
        if jaeger_url and trace_id:
            body["trace_url"] = trace_url(jaeger_url, trace_id)
        if self.cancel is not None:
            body["cancel"] = {"at": _iso(self.cancel.time), **self.cancel.cloudevent_data()}
        if self.request is not None:
            body["request"] = self.request.cloudevent_data()
        if self.outcome is not None:
            body["outcome"] = {"type": self.outcome.event_type, **self.outcome.cloudevent_data()}
        elif self.progress:
            body["progress"] = {
                "running_since": _iso(self.running_since),
                "counts": dict(sorted(self.running_counts.items())),
                "devices": [u.model_dump(mode="json") for u in self.live.values()],
                "logs": [line.model_dump(mode="json") for line in self.lines],
            }
        return body


def trace_url(jaeger_url: str, trace_id: str) -> str:
    """Jaeger's page for one trace."""
    return f"{jaeger_url.rstrip('/')}/trace/{trace_id}"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


class RequestBook:
    """Every request seen in the log, folded from its events in the order read.

    Args:
        only: keep these requests alone (``mayfly get``); None keeps all.
        keep_devices: keep each outcome's per-device results; without them
            (``mayfly list`` over a large log) only the counts per status stay.
    """

    def __init__(self, only: Iterable[str] | None = None, *, keep_devices: bool = True) -> None:
        self._only = frozenset(only) if only is not None else None
        self._keep_devices = keep_devices
        self._views: dict[str, RequestView] = {}
        self._by_prefix: dict[str, str] = {}
        self._collector = OutcomeCollector()

    def __len__(self) -> int:
        return len(self._views)

    def get(self, request_id: str) -> RequestView | None:
        return self._views.get(request_id)

    def ids(self) -> Iterator[str]:
        return iter(self._views)

    def add(self, event: MayflyEvent) -> RequestView | None:
        """Fold in one event from a lane, the results or the control topic; the
        view it changed, if any (events of requests not kept change none; a
        cancel changes only a request already seen)."""
        if isinstance(event, TaskRequest):
            return self._requested(event)
        if isinstance(event, TaskCompleted | TaskRejected):
            return self._outcome(event)
        if isinstance(event, TaskCancel):
            return self._canceled(event)
        return self._progressed(event)

    def _canceled(self, cancel: TaskCancel) -> RequestView | None:
        view = self._views.get(cancel.request_id)
        if view is None or view.cancel is not None:
            return None
        view.cancel = cancel
        return view

    def _view(self, root: str) -> RequestView | None:
        if self._only is not None and root not in self._only:
            return None
        view = self._views.get(root)
        if view is None:
            view = self._views[root] = RequestView(root)
            for prefix in shard_prefixes(root):
                self._by_prefix[prefix] = root
        return view

    def _requested(self, request: TaskRequest) -> RequestView | None:
        view = self._view(request.root_id)
        if view is None:
            return None
        if request.shard is not None:
            view.shards = request.shard.count
        elif view.request is None:  # a redelivery or a republish: the first one stands
            view.request = request
        return view

    def _progressed(self, report: TaskProgress) -> RequestView | None:
        view = self._view(report.root_id)
        if view is None or view.outcome is not None:
            return None  # not kept, or news older than the outcome (a shard run again)
        view.progress[report.request_id] = report
        for update in report.devices:
            view.live[update.device_id] = update
        view.lines.extend(report.logs)
        view.lines_seen += len(report.logs)
        return view

    def _outcome(self, event: Outcome) -> RequestView | None:
        root = root_of(event, self._by_prefix)
        if root is None:
            return None
        view = self._view(root)
        if view is None or view.outcome is not None:
            return None  # not kept, or a redelivery of an outcome already whole
        whole = self._collector.add(event, root)
        view.shards_done = self._collector.waiting(root)
        if whole is None:
            return view
        view.outcome = whole
        view.progress, view.live = {}, {}
        view.lines.clear()
        if isinstance(whole, TaskCompleted):
            view.device_counts = Counter(d.status.value for d in whole.devices)
            view.shards = len(whole.shards)
            view.shards_done = view.shards
            if not self._keep_devices:
                view.outcome = whole.model_copy(update={"devices": ()})
        return view

    def views(
        self,
        *,
        task: str | None = None,
        states: Iterable[RequestState] = (),
        since: datetime | None = None,
    ) -> list[RequestView]:
        """The requests that match, newest first (by when they were published)."""
        wanted = frozenset(states)
        found = [
            view
            for view in self._views.values()
            if (task is None or view.task == task)
            and (not wanted or view.state in wanted)
            and (since is None or (view.published_at is not None and view.published_at >= since))
        ]
        return sorted(
            found, key=lambda v: v.published_at.timestamp() if v.published_at else 0.0, reverse=True
        )
