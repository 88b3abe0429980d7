"""What every service is: the `Service` contract, where it keeps its files, shared helpers."""

from __future__ import annotations

import abc
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

SERVICES_HOME_ENV = "MAYFLY_SERVICES_HOME"
"""Overrides the folder holding pids, data and logs."""

HOST = "127.0.0.1"
NODE_IP = "10.77.0.1"
"""The `cluster` service's node address, inside its own network namespace only: its pods
reach the host's Kafka, S3 and Jaeger there, through relays to `HOST`."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.05
_LOG_TAIL_LINES = 40
DEV_DIR = Path(__file__).resolve().parent.parent
"""dev/: the committed build recipes (kafka/pom.xml, jaeger/go.mod) and configs."""


class ServiceError(Exception):
    """Raised when a service cannot be found, started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Paths:
    """Where one service keeps its pid, data and log."""

    run_dir: Path
    pid_file: Path
    data_dir: Path
    log_file: Path
    cache_dir: Path
    """Shared by all services and kept across runs: downloads and builds, never data."""
    install_log: Path

    @classmethod
    def for_service(cls, home: Path, name: str) -> Paths:
        return cls(
            run_dir=home / "run",
            pid_file=home / "run" / f"{name}.pid",
            data_dir=home / "data" / name,
            log_file=home / "logs" / f"{name}.log",
            cache_dir=home / "cache",
            install_log=home / "logs" / f"{name}-install.log",
        )


def services_home() -> Path:
    if home := os.environ.get(SERVICES_HOME_ENV):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "mayfly" / "services"


class Service(abc.ABC):
    """One server the tests need: how to start it, probe it and point clients at it."""

    name: ClassVar[str]
    port: ClassVar[int]
    """The port clients use."""
    ports: ClassVar[Mapping[str, int]]
    """Every TCP port the server listens on (all on `HOST`), by purpose; checked free first."""
    start_timeout: ClassVar[float] = START_TIMEOUT_S
    """Seconds from launch until the server must answer `probe`."""
    default: ClassVar[bool] = True
    """Whether `up` and `run` without names start it (else it is started only by name)."""
    keeps_data: ClassVar[bool] = False
    """Whether `restart` can start it again on the data it left (`up` always starts afresh)."""

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def unavailable(self) -> str | None:
        """Why this machine cannot run the service at all (e.g. it needs root), or None.

        `up` passes over such a service with that reason, unless CI=true: CI must run all.
        """
        return None

    def install(self, paths: Paths) -> None:  # noqa: B027 - optional hook, no-op by default
        """Fetch or build what the server needs into ``paths.cache_dir`` unless already there."""

    @abc.abstractmethod
    def command(self, paths: Paths) -> list[str]:
        """Write config into ``paths.run_dir`` or the data folder; return the server's argv.

        The data folder is fresh, except on a `restart` of a service that ``keeps_data``.

        The argv must name ``paths.data_dir`` (a file in it will do): that is how a recorded
        pid is told apart from an unrelated process that reused it.
        """

    @abc.abstractmethod
    def exports(self) -> dict[str, str]:
        """The environment variables that tell clients how to reach the server."""

    @abc.abstractmethod
    def probe(self) -> str | None:
        """Make one real request; return None if the server answered properly, else why not."""

    def after_stop(self, paths: Paths) -> None:  # noqa: B027 - optional hook, no-op by default
        """Remove what the stopped server left outside its data folder (default: nothing)."""

    def server_env(self, paths: Paths) -> dict[str, str]:
        """Environment for the server process: ours, with HOME and TMPDIR inside its data."""
        env = dict(os.environ)
        tmp = paths.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(HOME=str(paths.data_dir), TMPDIR=str(tmp))
        return env


NAMESPACE_TOOLS: Mapping[str, str] = {
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
}
"""Tools a service running in namespaces of its own needs, with their Debian packages."""


def namespaces_unavailable(
    needs_root_for: str, tools: Mapping[str, str], unshare: Sequence[str]
) -> str | None:
    """Why namespaces cannot be made here (not root, a tool missing, or ``unshare`` with
    these flags refused), or None. For `Service.unavailable`."""
    if os.geteuid() != 0:
        return f"{needs_root_for} needs root"
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH (Debian: {package})"
    # Root without CAP_SYS_ADMIN (some containers) cannot make them either.
    tried = subprocess.run(
        ["unshare", *unshare, "true"], capture_output=True, text=True, check=False
    )
    if tried.returncode != 0:
        return (
            f"cannot make namespaces here: `unshare {' '.join(unshare)}` ({tried.stderr.strip()})"
        )
    return None


def find_tool(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not on PATH: install {what}")
    return found


def run_logged(
    argv: Sequence[str],
    *,
    log_file: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Run argv to completion with its output appended to log_file; return its exit code."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            return -1


def install_step(
    service: Service,
    paths: Paths,
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> None:
    paths.install_log.parent.mkdir(parents=True, exist_ok=True)
    paths.install_log.write_bytes(b"")
    started = time.monotonic()
    code = run_logged(argv, log_file=paths.install_log, cwd=cwd, env=env)
    if code != 0:
        raise ServiceError(
            f"{service.name}: `{shlex.join(argv)}` failed (exit {code})"
            f"{log_tail(paths.install_log)}"
        )
    say(f"{service.name}: installed in {time.monotonic() - started:.0f}s")


def log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"\n(no log at {log_file})"
    body = "\n".join(f"    {line}" for line in lines)
    return f"\nlast {len(lines)} lines of {log_file}:\n{body}"


def say(message: str) -> None:
    # stderr, so `env` output and a `run` child's stdout stay clean.
    print(message, file=sys.stderr, flush=True)
