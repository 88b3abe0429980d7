"""Knative aggregator function: result CloudEvents in, traces and archive records out.

Served by functions-framework (``functions-framework --source main.py
--target aggregator``). An HTTP function rather than ``cloud_event``, for the
coordinator's reason: the framework's CloudEvent path answers ``200 OK`` with
a plain-text body, which a Kafka Broker Trigger counts as a failed delivery,
and picks its own status for input it cannot decode. Here every answer is an
empty body with the status Knative needs (see :mod:`mayfly.aggregator.ingest`):
202 taken, 400 undecodable (straight to the dead-letter sink, not retried),
503 archive unreachable (retried).

The aggregator, its telemetry and its archive are built once per instance
from the environment. Parts of a split result are buffered in memory, so run
this service with a single instance (``max-scale`` 1 and ``min-scale`` 1):
parts spread over instances, or lost with an instance scaled to zero, would
never make a whole result.
"""

from __future__ import annotations

from functools import cache

import flask
import functions_framework

from mayfly.app.functions import aggregator_service
from mayfly.app.wiring import AggregatorService


@cache
def service() -> AggregatorService:
    """This instance's aggregator; its spans are flushed when the process exits."""
    return aggregator_service()


@functions_framework.http
def aggregator(request: flask.Request) -> flask.Response:
    status = service().handle_http(request.headers, request.get_data())
    return flask.Response(b"", status=status)
