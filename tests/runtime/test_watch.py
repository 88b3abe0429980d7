"""``mayfly watch`` and a running request in ``mayfly get``, on SQLite and Kafka.

The fleet reboots slowly, so a request runs long enough for its coordinator
to report progress: the commands run as a user runs them, in processes of
their own, while ``mayfly up`` runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.runtime.conftest import Home
from tests.runtime.test_get_list import _json, _mayfly, _published_id, log_env

__all__ = ["log_env"]


def test_watch_follows_a_request_to_its_outcome_and_get_shows_it_running(
    home: Home, fleet, log_env: dict[str, str]
) -> None:
    fleet(4, reboot_time=2.0)
    home.up_with(output=home.root.parent / "up.log", **log_env)
    devices = [arg for i in range(1, 5) for arg in ("-d", f"sim-{i:04d}")]
    request_id = _published_id(_mayfly(home, log_env, "publish", "reboot", *devices))
    watch = subprocess.Popen(
        [sys.executable, "-m", "mayfly.cli", "watch", request_id, "--timeout", "120"],
        env=home.env(**log_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    seen: list[dict[str, object]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = _json(_mayfly(home, log_env, "get", request_id, "-o", "json"))
        seen.append(got)
        if got["state"] not in ("pending", "running"):
            break
        time.sleep(0.3)
    out, err = watch.communicate(timeout=120)

    running = [g for g in seen if g["state"] == "running"]
    assert running, [g["state"] for g in seen]
    progress = running[-1]["progress"]
    assert isinstance(progress, dict)
    assert sum(progress["counts"].values()) == 4
    assert {d["device_id"] for d in progress["devices"]} <= {f"sim-{i:04d}" for i in range(1, 5)}
    assert any(d["message"] == "rebooting" for d in progress["devices"]), json.dumps(progress)
    assert seen[-1]["state"] == "succeeded"

    assert watch.returncode == 0, out + err
    lines = out.splitlines()
    assert any("/4 done" in ln and "running" in ln for ln in lines), out
    assert "4/4 done  succeeded 4" in lines[-2]
    assert lines[-1] == f"{request_id} reboot 1.0.0: succeeded (4 succeeded)"


def test_watch_of_an_unknown_request_says_so(home: Home) -> None:
    run = _mayfly(home, {}, "watch", "no-such-request", "--timeout", "5")
    assert run.returncode == 1
    assert "no request 'no-such-request'" in run.stderr
