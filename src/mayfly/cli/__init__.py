"""The ``mayfly`` command line.

Every command reports a user's mistake as one readable line on stderr and a
non-zero exit status, never as a traceback: exit 1 for a failed operation,
2 for a usage error (wrong flags or arguments).
"""

from __future__ import annotations

import sys

import click

from mayfly import __version__
from mayfly.cli._group import MayflyGroup

__all__ = ["cli", "main"]

#: Each command, where it lives and its short help, imported only when it
#: runs: `mayfly up` then holds neither the simulator's aiohttp nor the
#: deploy's YAML and Kubernetes code (the dispatcher's resident memory,
#: bench/README.md), and `mayfly --help` imports no command at all. The
#: short help is each command's own (tests/cli/test_help.py keeps them equal).
_COMMANDS = {
    "pkg": ("mayfly.cli.pkg:pkg", "Build, sign, publish and inspect task packages."),
    "devices": ("mayfly.cli.devices:devices", "Work with device fleets."),
    "report": (
        "mayfly.cli.report:report",
        "Show how task types and devices fared, from the archived results.",
    ),
    "up": (
        "mayfly.cli.runtime:up",
        "Run the local runtime until Ctrl-C: dispatcher, coordinators, aggregator.",
    ),
    "publish": (
        "mayfly.cli.runtime:publish",
        "Publish task requests for TASK (or from --file) to the event log.",
    ),
    "plan": (
        "mayfly.cli.plan:plan",
        "Say what requests for TASK (or from --file) would do, without running them.",
    ),
    "get": (
        "mayfly.cli.tracking:get",
        "Show one request: its state, package, trace and every device's result.",
    ),
    "list": (
        "mayfly.cli.tracking:list_requests",
        "List published requests, newest first, with their state.",
    ),
    "watch": (
        "mayfly.cli.tracking:watch",
        "Follow one request live, with a progress bar, until its outcome.",
    ),
    "cancel": (
        "mayfly.cli.cancel:cancel",
        "Cancel a published request, whether it waits or runs.",
    ),
    "demo": (
        "mayfly.cli.demo:demo",
        "Run Mayfly end to end on this machine, with no server installed.",
    ),
    "deploy": (
        "mayfly.cli.deploy:deploy",
        "Render the Knative resources for TASK, a published task type (or a package folder).",
    ),
}


@click.group(
    cls=MayflyGroup,
    lazy_commands=_COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="mayfly")
def cli() -> None:
    """Mayfly runs actions against fleets of devices without a persistent coordinator.

    Task requests are CloudEvents; for each one a short-lived coordinator
    fetches the signed task package, runs it on the devices, reports and exits.
    """


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="mayfly", standalone_mode=True))
