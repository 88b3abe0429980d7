"""Knative waker function: a PingSource's ping in, one pass over the deferred topic.

Served by functions-framework (``functions-framework --source main.py
--target waker``). Each ping (every minute) moves the requests whose
schedule now lets them start back to their lanes, waits for those falling
due within the minute to move them at their time, and answers what it did.
"""

from __future__ import annotations

import json

import flask
import functions_framework

from mayfly.app.functions import wake_deferred


@functions_framework.http
def waker(request: flask.Request) -> flask.Response:
    report = wake_deferred()
    next_due = report.next_due.isoformat() if report.next_due is not None else None
    body = json.dumps({"released": report.released, "held": report.held, "next_due": next_due})
    return flask.Response(body, status=200, headers={"content-type": "application/json"})
