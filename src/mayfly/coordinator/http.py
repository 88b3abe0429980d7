"""The HTTP transport (a Knative Service): one CloudEvent delivery, answered properly.

The answer is an empty 202 or a reply CloudEvent, never a plain-text body: a
Kafka Broker Trigger counts a non-CloudEvent body as a failed delivery. With a
sink (``K_SINK``), outcomes go there and the answer is 202 (503 when the sink
would not take it, so the event is redelivered). Without one, the outcome is
the reply event, which a Broker routes onwards.

Whatever the delivery holds, the answer is one of those: an event that does
not decode is rejected (the rejection is bounded and fit for headers, so the
sink takes it and a 503 never has the broker redeliver what cannot succeed);
a decoder failure of any other kind counts as a bad event too; a reply that
cannot be encoded is an empty 400 (Knative's "unparsable": dead-lettered,
not retried) for a rejection, an empty 500 otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from mayfly.coordinator.pipeline import RequestPipeline
from mayfly.errors import EventError
from mayfly.events import (
    MayflyEvent,
    TaskCompleted,
    TaskRejected,
    from_http,
    peek_attributes,
    split_completed,
    to_http,
)
from mayfly.exitcodes import ExitCode

__all__ = ["Defer", "HttpAnswer", "answer_http"]

HttpAnswer = tuple[int, dict[str, str], bytes]
_LOG = logging.getLogger("mayfly.coordinator")


#: Puts a request its schedule holds, as binary-mode headers and body marked
#: with when it may start, where the waker finds it (the deferred topic).
Defer = Callable[[dict[str, str], bytes], None]


def answer_http(
    pipeline: RequestPipeline,
    headers: Mapping[str, str],
    body: bytes,
    defer: Defer | None = None,
) -> HttpAnswer:
    """Run one delivery through ``pipeline`` and answer it; never raises.

    A request its schedule holds goes to ``defer`` (then the delivery is
    acknowledged); without one, or when it fails, it is answered ``503`` with
    a ``Retry-After`` of the seconds to wait."""
    plain = dict(headers)

    def read() -> MayflyEvent:
        try:
            return from_http(plain, body)
        except EventError:
            raise
        except Exception as exc:  # a decoder's bug on this input: still a bad event
            _LOG.exception("decoding the delivery failed")
            raise EventError("data", f"cannot be decoded ({type(exc).__name__})") from exc

    try:
        handled = pipeline.handle(
            read, lambda: peek_attributes(plain, body), received_at=datetime.now(UTC)
        )
    except Exception:
        _LOG.exception("the delivery failed; answering 500 so it is redelivered")
        return 500, {}, b""
    outcome = handled.outcome
    if handled.code is ExitCode.DEFERRED and handled.defer_until is not None:
        if defer is not None and _deferred(defer, plain, body, handled.defer_until):
            return 202, {}, b""
        # Held by its schedule: redelivered no sooner than it opens, where the
        # Trigger honours Retry-After (Knative's delivery-retryafter feature).
        wait_s = (handled.defer_until - datetime.now(UTC)).total_seconds()
        return 503, {"Retry-After": str(max(1, math.ceil(wait_s)))}, b""
    if handled.code is ExitCode.UNDELIVERED:
        _LOG.error("answering 503 so the event is redelivered")
        return 503, {}, b""
    if outcome is None or pipeline.sink is not None:
        return 202, {}, b""  # delivered to the sink, or not ours to run
    parts = split_completed(outcome) if isinstance(outcome, TaskCompleted) else (outcome,)
    if len(parts) > 1:
        _LOG.error(
            "result of %s needs %d events; set K_SINK for large fan-outs", parts[0].id, len(parts)
        )
        return 500, {}, b""
    try:
        reply_headers, reply_body = to_http(parts[0], "binary")
    except EventError:
        _LOG.exception("the reply to %s cannot be encoded", outcome.request_id or outcome.id)
        return (400 if isinstance(outcome, TaskRejected) else 500), {}, b""
    return 200, reply_headers, reply_body


def _deferred(defer: Defer, headers: dict[str, str], body: bytes, until: datetime) -> bool:
    """Hand a held request to ``defer``, re-encoded in binary mode (a
    structured delivery has no headers to mark); False when that failed."""
    try:
        request = from_http(headers, body)
        marked, encoded = to_http(request, "binary")
        marked["ce-notbefore"] = until.astimezone(UTC).isoformat()
        defer(marked, encoded)
    except Exception:
        _LOG.exception("the held request could not be deferred; answering 503")
        return False
    _LOG.info("%s: held by its schedule until %s", request.id, until.isoformat())
    return True
