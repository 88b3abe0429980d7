"""``mayfly publish --wait``: the outcome printed, and job mode's exit code.

A real ``mayfly up`` on the SQLite log and on real Kafka, a simulated fleet,
and ``mayfly publish`` as a user runs it, in its own process.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from tests.runtime.conftest import Home


@pytest.fixture(params=["sqlite", "kafka"])
def log_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    prefix = f"w{uuid.uuid4().hex[:8]}"
    return {"MAYFLY_EVENT_LOG": f"kafka://{bootstrap}", "MAYFLY_TOPIC_PREFIX": prefix}


def _publish(home: Home, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly.cli", "publish", "--wait", *args],
        env=home.env(**env),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_wait_prints_each_outcome_and_exits_with_the_worst(
    home: Home, fleet, log_env: dict[str, str]
) -> None:
    fleet(3, broken=["sim-0002"])
    home.up_with(output=home.root.parent / "up.log", **log_env)

    ok = _publish(home, log_env, "reboot", "-d", "sim-0001", "--timeout", "120")
    partial = _publish(home, log_env, "reboot", "-d", "sim-0001", "-d", "sim-0002")
    # --no-validate: the runtime's rejection is what is under test.
    rejected = _publish(
        home, log_env, "config-push", "-d", "sim-0003", "-p", "config=7", "--no-validate"
    )

    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "reboot 1.0.0: succeeded (1 succeeded)" in ok.stdout
    assert partial.returncode == 3, partial.stdout + partial.stderr
    assert "partial (1 failed, 1 succeeded)" in partial.stdout
    assert rejected.returncode == 5, rejected.stdout + rejected.stderr
    assert "rejected (invalid_params)" in rejected.stdout


def test_wait_without_a_runtime_gives_up_at_its_timeout(home: Home, fleet) -> None:
    fleet(1)

    run = _publish(home, {}, "reboot", "-d", "sim-0001", "--timeout", "1")

    assert run.returncode == 1
    assert "no outcome within 1 s for 1 of 1 request(s)" in run.stderr
