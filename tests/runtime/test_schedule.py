"""A scheduled rollout on a real ``mayfly up`` (SQLite and Kafka): a request in
a maintenance window that opens 20 s after it is published waits for it,
held by the runtime with its record uncommitted; a runtime stopped and
started meanwhile does not start it early; it starts when the window opens,
as ``mayfly plan`` said."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]

OPENS_IN_S = 20


def test_a_request_in_a_window_starts_when_it_opens_across_a_runtime_restart(
    home: Home, fleet, log_env: dict[str, str], tmp_path: Path
) -> None:
    server = fleet(3)
    ids = server.simulator.device_ids()
    opens = (datetime.now(UTC) + timedelta(seconds=OPENS_IN_S)).replace(microsecond=0)
    window = {
        "start": opens.strftime("%H:%M:%S"),
        "end": (opens + timedelta(minutes=30)).strftime("%H:%M:%S"),
    }
    spec = tmp_path / "scheduled.json"
    spec.write_text(
        json.dumps(
            {
                "task": "reboot",
                "devices": ids,
                "rollout": {"schedule": {"windows": [window], "time_zone": "UTC"}},
            }
        )
    )
    planned = _json(_mayfly(home, log_env, "plan", "--file", str(spec), "-o", "json"))
    assert planned[0]["schedule"]["opens_at"] == opens.isoformat()
    table = _mayfly(home, log_env, "plan", "--file", str(spec)).stdout
    rows = dict(line.split(None, 1) for line in table.splitlines() if line.strip())
    assert rows["starts"] == f"{opens.isoformat()} (its schedule)", table

    first = home.up_with("-v", output=tmp_path / "up-1.log", **log_env)
    try:
        published = _mayfly(home, log_env, "publish", "--file", str(spec))
        assert published.returncode == 0, published.stdout + published.stderr
        request_id = _published_id(published)
        # Its coordinator saw the window closed and gave it back to the runtime.
        _wait_for(tmp_path / "up-1.log", "held by its schedule", within_s=OPENS_IN_S / 2)
        got = _mayfly(home, log_env, "get", request_id).stdout
        assert f"closed: its devices start from {opens:%Y-%m-%d %H:%M:%S}Z" in got, got
        watched = _mayfly(home, log_env, "watch", request_id, "--timeout", "1")
        assert "not running yet; closed: its devices start from" in watched.stdout, watched
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    assert datetime.now(UTC) < opens, "too slow to restart before the window"
    assert all(server.simulator.records(d)["last_request_at"] is None for d in ids)

    second = home.up_with("-v", output=tmp_path / "up-2.log", **log_env)
    try:
        outcome = _outcome(home, log_env, request_id, within_s=OPENS_IN_S * 3)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    assert outcome["status"] == "succeeded", outcome
    starts = [datetime.fromisoformat(d["started_at"]) for d in outcome["devices"]]
    assert min(starts) >= opens, (min(starts), opens)
    assert min(starts) - opens < timedelta(seconds=5), (min(starts), opens)
    assert "held by its schedule" in (tmp_path / "up-2.log").read_text()


def _wait_for(log: Path, text: str, *, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def _outcome(home: Home, env: dict[str, str], request_id: str, *, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        got = _json(_mayfly(home, env, "get", request_id, "-o", "json"))
        if got.get("outcome"):
            return got["outcome"]
        assert time.monotonic() < deadline, got
        time.sleep(1.0)
