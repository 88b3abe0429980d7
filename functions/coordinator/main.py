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

from mayfly.coordinator import Coordinator, build_coordinator, handle_http
from mayfly.coordinator.sinks import ResultSink, open_sink
from mayfly.settings import Settings


@cache
def _instance() -> tuple[Coordinator, ResultSink | None]:
    settings = Settings.from_env()
    sink = open_sink(settings.result_sink) if settings.result_sink != "-" else None
    return build_coordinator(settings, "knative"), sink


@functions_framework.http
def coordinator(request: flask.Request) -> flask.Response:
    core, sink = _instance()
    status, headers, body = handle_http(core, sink, request.headers, request.get_data())
    return flask.Response(body, status=status, headers=headers)
