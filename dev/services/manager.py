"""Starting, probing and stopping the servers: pid files, busy ports, waits and signals."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from services.base import (
    HOST,
    POLL_S,
    STOP_TIMEOUT_S,
    Paths,
    Service,
    ServiceError,
    log_tail,
    say,
)


def port_in_use(port: int) -> bool:
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


class Manager:
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

    def start(self, service: Service, *, keep_data: bool = False) -> bool:
        """Start the service unless ours is already running; return True if this call started it.

        ``keep_data``: on the data folder its last run left (a restart), not a fresh one.
        """
        paths = self.paths(service)
        if keep_data and not service.keeps_data:
            raise ServiceError(f"{service.name}: cannot start again on its data; use `up`")
        if self.pid(service) is not None:
            self._wait_healthy(service, paths, child=None)
            return False
        busy = [f"{port} ({what})" for what, port in service.ports.items() if port_in_use(port)]
        if busy:
            raise ServiceError(
                f"{service.name}: port {', '.join(busy)} on {HOST} is already in use by a process "
                f"this script did not start; stop it and retry (`ss -ltnp` shows who holds it)"
            )
        service.install(paths)
        if keep_data and paths.data_dir.is_dir():
            for folder in (paths.run_dir, paths.log_file.parent):
                folder.mkdir(parents=True, exist_ok=True)
        else:
            self._fresh_dirs(paths)
        started = time.monotonic()
        argv = service.command(paths)
        env = service.server_env(paths)
        with paths.log_file.open("ab") as log:  # after anything `command` ran and logged
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
        say(
            f"{service.name}: up at {service.endpoint} in {time.monotonic() - started:.1f}s "
            f"(pid {child.pid}, log {paths.log_file})"
        )
        return True

    @staticmethod
    def _fresh_dirs(paths: Paths) -> None:
        shutil.rmtree(paths.data_dir, ignore_errors=True)
        for folder in (paths.run_dir, paths.data_dir, paths.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        paths.log_file.write_bytes(b"")

    def _wait_healthy(
        self, service: Service, paths: Paths, child: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + service.start_timeout
        while True:
            problem = service.probe()
            if problem is None:
                return
            if child is not None and child.poll() is not None:
                raise ServiceError(
                    f"{service.name}: server exited with code {child.returncode} while starting"
                    f"{log_tail(paths.log_file)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{service.name}: not healthy after {service.start_timeout:.0f}s ({problem})"
                    f"{log_tail(paths.log_file)}"
                )
            time.sleep(POLL_S)

    def stop(self, service: Service, *, kill: bool = False) -> bool:
        """Stop our server if it runs (SIGTERM, then SIGKILL; ``kill``: SIGKILL at once, as a
        crash would); return True if one was stopped."""
        paths = self.paths(service)
        pid = self.pid(service)
        if pid is None:
            paths.pid_file.unlink(missing_ok=True)
            # It may have died on its own, or while starting: what it left outside its
            # data folder is still to clean up (`after_stop` does nothing where nothing is).
            service.after_stop(paths)
            return False
        steps = ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0))
        for sig, grace in steps[1:] if kill else steps:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                # A test may have paused the server (`kill -STOP $(python dev/services pid NAME)`):
                # a stopped process would only act on SIGTERM once continued.
                os.kill(pid, signal.SIGCONT)
            if self._wait_gone(service, pid, grace):
                break
        else:
            raise ServiceError(f"{service.name}: pid {pid} survived SIGKILL")
        self._children.pop(service.name, None)
        paths.pid_file.unlink(missing_ok=True)
        service.after_stop(paths)
        say(f"{service.name}: stopped (pid {pid})")
        return True

    def restart(self, service: Service, *, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop the server (``kill``: with SIGKILL), wait ``down_s`` seconds, and start it
        again on the data it left, as an operator restarts a broker that went down."""
        if not service.keeps_data:
            raise ServiceError(f"{service.name}: cannot start again on its data; use `up`")
        self.stop(service, kill=kill)
        time.sleep(down_s)
        self.start(service, keep_data=True)

    def _wait_gone(self, service: Service, pid: int, timeout: float) -> bool:
        child = self._children.get(service.name)
        if child is not None and child.pid == pid:  # not one that another process restarted
            try:
                child.wait(timeout)  # our own child: reap it, leave no zombie
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(POLL_S)
        return False
