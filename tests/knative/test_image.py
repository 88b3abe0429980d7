"""The Containerfile's start command, run here as the image would run it.

No container engine is available to the tests, so the image itself is not
built; its entry point is, with /app/functions pointing at this checkout's
functions/: each FUNCTION_TARGET must start its function and answer a delivery.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).parents[2]
CONTAINERFILE = ROOT / "Containerfile"


def _instruction(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+)$", CONTAINERFILE.read_text(), re.MULTILINE)


def test_image_runs_as_a_fixed_non_root_user_and_copies_only_what_exists() -> None:
    (user,) = _instruction("USER")
    uid, _, gid = user.partition(":")
    assert int(uid) > 0
    assert int(gid) > 0
    for copy in _instruction("COPY"):
        *sources, _ = [w for w in copy.split() if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "src/", "functions/"):
        assert f"!{needed}" in ignored, f".dockerignore keeps {needed} out of the build"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start_function(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        (entrypoint,) = _instruction("ENTRYPOINT")
        argv = [
            a.replace("/app/functions", str(ROOT / "functions")) for a in json.loads(entrypoint)
        ]
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAYFLY_", "K_", "OTEL_"))}
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            PATH=f"{bin_dir}:{env.get('PATH', '')}",
            FUNCTION_TARGET=target,
            PORT=str(port),
            HOST="127.0.0.1",
            MAYFLY_HOME=str(tmp_path / target),
            WORKERS="1",
            THREADS="2",
        )
        with (tmp_path / f"{target}.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return url
            except OSError:
                if procs[-1].poll() is not None:
                    break
                time.sleep(0.1)
        pytest.fail(f"{target} did not start: {(tmp_path / f'{target}.log').read_text()}")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs /bin/sh, as the image has")
def test_each_function_target_starts_and_answers_a_delivery(
    start_function: Callable[[str], str],
) -> None:
    start = start_function
    headers = {"content-type": "application/json", "ce-specversion": "1.0"}

    coordinator = start("coordinator")
    answer = requests.post(coordinator, data=b"not an event", headers=headers, timeout=30)
    # No K_SINK here, so the rejection comes back as the reply CloudEvent.
    assert answer.status_code == 200
    assert answer.headers["ce-type"] == "dev.mayfly.task.rejected"

    aggregator = start("aggregator")
    answer = requests.post(aggregator, data=b"not an event", headers=headers, timeout=30)
    assert answer.status_code == 400  # straight to the dead-letter sink
    assert answer.content == b""

    # A PingSource's ping: one pass over the deferred topic (empty here).
    waker = start("waker")
    ping = {**headers, "ce-type": "dev.knative.sources.ping", "ce-id": "1", "ce-source": "ping"}
    answer = requests.post(waker, data=b"{}", headers=ping, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"released": 0, "held": 0, "next_due": None}
