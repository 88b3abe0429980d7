"""The demo, small: every request accounted for, traces written, insights archived.

Its trace file is the spans of a real run (publisher, runtime, aggregator):
they are checked against the OpenTelemetry messaging and CloudEvents
conventions here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mayfly.app.demo import DemoPlan, run_demo

_PRODUCER, _CONSUMER, _ERROR = 4, 5, 2


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}


def test_demo_accounts_for_every_request(tmp_path: Path) -> None:
    lines: list[str] = []
    home = tmp_path / "demo"
    code = run_demo(DemoPlan(home=home, devices=40, timeout_s=90, echo=lines.append))
    text = "\n".join(lines)
    assert code == 0, text
    assert "every one of the 22 requests is accounted for" in text
    traces = home / "traces.otlp.jsonl"
    spans: list[dict[str, Any]] = []
    for line in traces.read_text().splitlines():
        for resource in json.loads(line)["resourceSpans"]:
            service = {
                a["key"]: a["value"]["stringValue"] for a in resource["resource"]["attributes"]
            }
            for scope in resource["scopeSpans"]:
                spans += [span | {"service": service["service.name"]} for span in scope["spans"]]
    by_id = {s["spanId"]: s for s in spans}

    sends = [s for s in spans if s["kind"] == _PRODUCER]
    processes = [s for s in spans if s["kind"] == _CONSUMER]
    assert len(sends) == len(processes) == 22
    for send in sends:
        attributes = _attributes(send)
        assert send["service"] == "mayfly-publisher"
        assert send["name"] == f"send {attributes['messaging.destination.name']}"
        assert attributes["messaging.destination.name"].startswith("mayfly.requests.")
        assert attributes["messaging.operation.type"] == "send"
        assert attributes["messaging.operation.name"] == "send"
        assert attributes["messaging.system"] == "sqlite"
        assert attributes["messaging.message.id"] == attributes["cloudevents.event_id"]
        assert attributes["cloudevents.event_type"] == "dev.mayfly.task.requested"
    for process in processes:
        attributes = _attributes(process)
        assert process["service"] == "mayfly-aggregator"
        # The request's message, consumed from its lane by the dispatchers' group.
        send = by_id[process["parentSpanId"]]
        assert attributes["messaging.message.id"] == _attributes(send)["messaging.message.id"]
        assert (
            attributes["messaging.destination.name"]
            == _attributes(send)["messaging.destination.name"]
        )
        assert process["name"] == f"process {attributes['messaging.destination.name']}"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.consumer.group.name"] == "mayfly-dispatcher"
        assert attributes["cloudevents.event_type"] == "dev.mayfly.task.requested"
    assert len([s for s in spans if s["name"].startswith("task ")]) == 21  # one was rejected
    assert any(s["name"].startswith("device ") for s in spans)
    # No child starts before its parent, nor (but a consumer: it follows a
    # send, asynchronously) ends after it; every failure says its type.
    for span in spans:
        parent = by_id.get(span.get("parentSpanId", ""))
        if parent is not None:
            assert int(span["startTimeUnixNano"]) >= int(parent["startTimeUnixNano"]), span["name"]
            if span["kind"] != _CONSUMER:
                assert int(span["endTimeUnixNano"]) <= int(parent["endTimeUnixNano"]), span["name"]
        if span.get("status", {}).get("code") == _ERROR:
            assert _attributes(span).get("error.type"), span["name"]
    assert list((home / "archive").glob("*.jsonl"))
