"""The demo, small: every request accounted for, traces written, insights archived."""

from __future__ import annotations

import json
from pathlib import Path

from mayfly.app.demo import DemoPlan, run_demo


def test_demo_accounts_for_every_request(tmp_path: Path) -> None:
    lines: list[str] = []
    home = tmp_path / "demo"
    code = run_demo(DemoPlan(home=home, devices=40, timeout_s=90, echo=lines.append))
    text = "\n".join(lines)
    assert code == 0, text
    assert "every one of the 22 requests is accounted for" in text
    traces = home / "traces.otlp.jsonl"
    spans = [
        span
        for line in traces.read_text().splitlines()
        for resource in json.loads(line)["resourceSpans"]
        for scope in resource["scopeSpans"]
        for span in scope["spans"]
    ]
    roots = [s for s in spans if s["name"].startswith("task ")]
    assert len(roots) == 22
    assert any(s["name"].startswith("device ") for s in spans)
    assert list((home / "archive").glob("*.jsonl"))
