"""The "Your first package" guide of taskpkgs/README.md, run word for word in
an empty folder, with the test Jaeger as the tracing backend: every command
succeeds, and the request's trace is then in Jaeger."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.conftest import JaegerServer

GUIDE = Path(__file__).parents[1] / "taskpkgs" / "README.md"


def _guide_commands() -> str:
    text = GUIDE.read_text()
    section = text.split("## Your first package", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the guide has no sh block"
    return block.group(1)


def test_the_first_package_guide_runs_word_for_word(tmp_path: Path, jaeger: JaegerServer) -> None:
    commands = _guide_commands()
    assert commands.startswith("mkdir first && cd first\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = jaeger.otlp_endpoint
    env["MAYFLY_JAEGER_URL"] = jaeger.query_url
    # Output to a file, the shell in a session of its own: should a command
    # fail and leave `mayfly up` or the simulator behind, they are ended with
    # it and hold no pipe open.
    log = tmp_path / "guide.log"
    with log.open("w") as sink:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", commands],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = shell.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(timeout=30)
    out = log.read_text()
    assert returncode == 0, out[-4000:]
    assert "hello 0.1.0: succeeded (3 succeeded)" in out  # the development run
    assert "1 passed" in out  # the package's own test
    assert re.search(r"hello 0\.1\.0: succeeded \(2 succeeded\)", out), out[-3000:]
    assert re.search(r"hello\s+0\.1\.0\s+succeeded\s+2/2 ok", out), out[-3000:]
    link = re.search(r"-> mayfly\.requests\.normal trace ([0-9a-f]{32})", out)
    assert link, out[-3000:]
    deadline = time.monotonic() + 30
    spans: list[object] = []
    while time.monotonic() < deadline and not spans:
        answer = requests.get(f"{jaeger.query_url}/api/traces/{link.group(1)}", timeout=10)
        if answer.status_code == 200:
            spans = [s for t in answer.json().get("data", []) for s in t["spans"]]
        time.sleep(0.5)
    assert spans, "the request's trace is not in Jaeger"
