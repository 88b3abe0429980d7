"""The HTTP transport (a Knative Service): one CloudEvent delivery, answered properly.

The answer is an empty 202 or a reply CloudEvent, never a plain-text body: a
Kafka Broker Trigger counts a non-CloudEvent body as a failed delivery. With a
sink (``K_SINK``), outcomes go there and the answer is 202 (503 when the sink
would not take it, so the event is redelivered). Without one, the outcome is
the reply event, which a Broker routes onwards.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from mayfly.coordinator.pipeline import RequestPipeline
from mayfly.events import TaskCompleted, from_http, peek_attributes, split_completed, to_http
from mayfly.exitcodes import ExitCode

__all__ = ["HttpAnswer", "answer_http"]

HttpAnswer = tuple[int, dict[str, str], bytes]
_LOG = logging.getLogger("mayfly.coordinator")


def answer_http(pipeline: RequestPipeline, headers: Mapping[str, str], body: bytes) -> HttpAnswer:
    """Run one delivery through ``pipeline`` and answer it."""
    plain = dict(headers)
    handled = pipeline.handle(
        lambda: from_http(plain, body),
        lambda: peek_attributes(plain, body),
        received_at=datetime.now(UTC),
    )
    outcome = handled.outcome
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
    reply_headers, reply_body = to_http(parts[0], "binary")
    return 200, reply_headers, reply_body
