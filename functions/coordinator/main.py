"""Knative coordinator function: a CloudEvent in, an empty 202 or a reply CloudEvent out.

Served by functions-framework (``functions-framework --source main.py
--target coordinator``). Settings, the package repository and the result sink
are set up once per instance, on the first request; each request then runs in
this instance (containerConcurrency 1), which Knative scales to zero when idle.
"""

from __future__ import annotations

from functools import cache

import flask
import functions_framework

from mayfly.app.functions import coordinator_deferral, coordinator_pipeline
from mayfly.coordinator import RequestPipeline
from mayfly.coordinator.http import Defer, answer_http


@cache
def pipeline() -> RequestPipeline:
    """This instance's request pipeline, built on the first delivery."""
    return coordinator_pipeline()


@cache
def deferral() -> Defer | None:
    """Where a request its schedule holds goes (the deferred topic), if anywhere."""
    return coordinator_deferral()


@functions_framework.http
def coordinator(request: flask.Request) -> flask.Response:
    status, headers, body = answer_http(
        pipeline(), request.headers, request.get_data(), defer=deferral()
    )
    return flask.Response(body, status=status, headers=headers)
