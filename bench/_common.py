"""What every benchmark shares: servers it starts itself, a Mayfly home, percentiles.

Everything here binds to 127.0.0.1, runs as a child process of the benchmark
(stopped by pid when the benchmark ends, whatever happens) and leaves nothing
in the checkout: homes and logs live in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mayfly.settings import Settings
from mayfly.testing import publish_folders

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

#: The action every benchmark runs on a device: one HTTP POST, applied once.
PUSH_PAYLOAD = {"config": {"log_level": "info"}, "mode": "merge"}
PUSH = {
    "name": "bench-push",
    "version": "1.0.0",
    "entrypoint": "bench_push:run",
    "limits": {
        "timeout_s": 600,
        "device_timeout_s": 15,
        "memory_mb": 128,
        "max_parallel": 1000,
        "retries": 1,
    },
    "capabilities": ["config"],
}
PUSH_CODE = f"""\
def run(ctx):
    answer = ctx.device.action("config-push", {PUSH_PAYLOAD!r})
    return answer["action"]
"""
NOOP = {
    "name": "noop",
    "version": "1.0.0",
    "entrypoint": "noop:run",
    "limits": {"retries": 0, "device_timeout_s": 10},
}
NOOP_CODE = "def run(ctx):\n    return 'ok'\n"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    """The machine the figures come from."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def service_env() -> dict[str, str]:
    """Where `make up`'s servers are (Kafka, S3, Jaeger), from dev/services."""
    out = subprocess.run(
        [PYTHON, str(ROOT / "dev" / "services"), "env"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            found[m.group(1)] = m.group(2).strip("'\"")
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


class Child:
    """A server process this benchmark started; stopped by its own pid, never by name."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, env=dict(env), cwd=log.parent
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        """Wait until the log shows ``pattern``; the match."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            m = re.search(pattern, text)
            if m:
                return m
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{text[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {pattern!r} within {timeout_s} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


@dataclass
class Fleet:
    url: str
    inventory: Path
    child: Child


@contextlib.contextmanager
def simulator(root: Path, count: int) -> Iterator[Fleet]:
    """``mayfly devices simulate`` in its own process: it must not share a GIL with the load."""
    inventory = root / f"inventory-{count}.json"
    child = Child(
        "simulator",
        [
            PYTHON,
            "-m",
            "mayfly",
            "devices",
            "simulate",
            "--count",
            str(count),
            "--port",
            "0",
            "--inventory",
            str(inventory),
        ],
        root / f"simulator-{count}.log",
        os.environ,
    )
    try:
        m = child.wait_for(r"at (http://127\.0\.0\.1:\d+)/devices")
        yield Fleet(m.group(1), inventory, child)
    finally:
        child.stop(signal.SIGINT)


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 without persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing: `make bench` installs it (Debian package)")
    port = free_port()
    child = Child(
        "redis",
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--dir",
            str(root),
        ],
        root / "redis.log",
        os.environ,
    )
    try:
        child.wait_for(r"Ready to accept connections")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        child.stop()


def mayfly_env(root: Path, inventory: Path, **extra: str) -> dict[str, str]:
    """An environment naming a fresh Mayfly home under ``root`` and nothing else of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAYFLY_", "TASK_", "OTEL_", "K_SINK"))
    }
    env |= {"MAYFLY_HOME": str(root / "home"), "MAYFLY_INVENTORY": str(inventory)}
    return env | extra


def publish_packages(env: Mapping[str, str]) -> None:
    """Sign and publish the benchmark packages (bench-push, noop) into the home's store."""
    settings = Settings.from_env(env)
    folders = []
    for manifest, module, code in (
        (PUSH, "bench_push", PUSH_CODE),
        (NOOP, "noop", NOOP_CODE),
    ):
        folder = settings.home.parent / f"pkg-{manifest['name']}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        (folder / f"{module}.py").write_text(code)
        folders.append(folder)
    publish_folders(settings, folders)


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
