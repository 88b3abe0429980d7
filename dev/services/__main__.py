"""The command line: ``python dev/services COMMAND`` (the commands: see __init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

if not __package__:
    # Run as `python dev/services`: sys.path[0] is then this folder, where each module would
    # pass for a top-level one (kafka.py for kafka-python). Put the folder holding the
    # package there instead, and import the modules as `services.*`, as tests can too.
    _HERE = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0]).resolve() == _HERE:
        del sys.path[0]
    sys.path.insert(0, str(_HERE.parent))

from services.base import SERVICES_HOME_ENV, Service, ServiceError, say, services_home
from services.manager import Manager, port_in_use
from services.registry import SERVICES

PROG = "python dev/services"
"""How this is run; argparse's usage and every error message name it."""


def _select(names: Sequence[str], *, everything: bool = False) -> list[Service]:
    """The services named, or with no names the default ones (all of them if
    ``everything``: `down` stops an opt-in service too)."""
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise ServiceError(f"unknown service {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    # In the registry's order, whatever the command line's: `up knative kube` starts kube first.
    if names:
        return [service for name, service in SERVICES.items() if name in names]
    return [service for service in SERVICES.values() if everything or service.default]


def _up(manager: Manager, services: Sequence[Service]) -> list[Service]:
    started: list[Service] = []
    with manager.lock():
        try:
            for service in services:
                if (reason := service.unavailable()) is not None:
                    if os.environ.get("CI") == "true":
                        raise ServiceError(f"{service.name}: cannot run here: {reason}")
                    say(f"{service.name}: passed over: {reason} (its tests will skip)")
                    continue
                if manager.start(service):
                    started.append(service)
                else:
                    say(f"{service.name}: already running at {service.endpoint}")
        except BaseException:
            for service in reversed(started):
                manager.stop(service)
            raise
    say(f"logs: {manager.home / 'logs'}")
    return started


def _down(manager: Manager, services: Sequence[Service]) -> None:
    with manager.lock():
        for service in reversed(services):
            if not manager.stop(service):
                say(f"{service.name}: not running (nothing started by this script)")


def _status(manager: Manager) -> None:
    for service in SERVICES.values():
        paths = manager.paths(service)
        pid = manager.pid(service)
        state, note = ("stopped" if pid is None else "running"), ""
        if pid is not None and (problem := service.probe()) is not None:
            note = f"  (unhealthy: {problem})"
        elif pid is None and any(port_in_use(port) for port in service.ports.values()):
            note = "  (its ports are held by a process this script did not start)"
        print(
            f"{service.name:<7} {state:<8} {service.endpoint}  pid {pid or '-'}  "
            f"log {paths.log_file}{note}"
        )


def _env(manager: Manager) -> None:
    for service in SERVICES.values():
        if manager.pid(service) is None:
            say(f"# {service.name} is not running: `make up` starts it")
            continue
        for key, value in service.exports().items():
            print(f"export {key}={shlex.quote(value)}")


def _pid(manager: Manager, service: Service) -> None:
    pid = manager.pid(service)
    if pid is None:
        raise ServiceError(f"{service.name} is not running (nothing started by this script)")
    print(pid)


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> NoReturn:
    raise _Terminated(signum)


def _run(manager: Manager, command: Sequence[str], also: Sequence[str] = ()) -> int:
    """Run CMD with the default services up, and those named in ``also``; stop afterwards
    only what this call started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    started: list[Service] = []
    try:
        wanted = {service.name for service in _select([])} | set(also)
        started = _up(manager, _select(sorted(wanted)))
        env = dict(os.environ)
        for service in SERVICES.values():
            if manager.pid(service) is not None:  # not one `_up` passed over
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
        print(f"{PROG}: error: cannot run {shlex.join(command)}: {exc}", file=sys.stderr)
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
        prog=PROG,
        description="Manage the real servers (on 127.0.0.1) that the integration tests use.",
        epilog=f"State, data and logs: {services_home()} (set {SERVICES_HOME_ENV} to move).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = [name for name, service in SERVICES.items() if service.default]
    names_help = (
        f"services (default: {', '.join(defaults)}; also: "
        + ", ".join(name for name in SERVICES if name not in defaults)
        + ")"
    )
    up = commands.add_parser("up", help="start services and wait until they answer")
    up.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    down = commands.add_parser("down", help="stop services that `up` started")
    down.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    restart = commands.add_parser(
        "restart", help="stop a server and start it again on the data it left (kafka)"
    )
    restart.add_argument("name", metavar="NAME", choices=list(SERVICES), help=", ".join(SERVICES))
    restart.add_argument("--kill", action="store_true", help="SIGKILL it, as a crash would")
    restart.add_argument(
        "--down-s", type=float, default=0.0, metavar="S", help="seconds it stays down"
    )
    commands.add_parser("status", help="show each service's state, endpoint, pid and log")
    commands.add_parser("env", help="print `export` lines for the running services")
    pid = commands.add_parser("pid", help="print the pid of a running server")
    pid.add_argument("name", metavar="NAME", choices=list(SERVICES), help=", ".join(SERVICES))
    run = commands.add_parser(
        "run", help="run a command with the services up, then stop what it started"
    )
    run.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME",
        choices=[name for name, service in SERVICES.items() if not service.default],
        help="also start this service, which `up` starts only by name (repeatable)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manager = Manager(services_home())
    try:
        if args.command == "up":
            _up(manager, _select(args.names))
        elif args.command == "down":
            _down(manager, _select(args.names, everything=True))
        elif args.command == "status":
            _status(manager)
        elif args.command == "env":
            _env(manager)
        elif args.command == "pid":
            _pid(manager, SERVICES[args.name])
        elif args.command == "restart":
            with manager.lock():
                manager.restart(SERVICES[args.name], kill=args.kill, down_s=args.down_s)
        elif args.command == "run":
            command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not command:
                raise ServiceError(f"run needs a command: {PROG} run -- CMD...")
            return _run(manager, command, args.also)
    except ServiceError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
