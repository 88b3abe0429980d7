"""The ``mayfly`` command line.

Every command reports a user's mistake as one readable line on stderr and a
non-zero exit status, never as a traceback: exit 1 for a failed operation,
2 for a usage error (wrong flags or arguments).
"""

from __future__ import annotations

import sys

import click

from mayfly import __version__
from mayfly.cli._common import MayflyGroup

__all__ = ["cli", "main"]

#: Each command and where it lives, imported only when it runs: `mayfly up`
#: then holds neither the simulator's aiohttp nor the deploy's YAML and
#: Kubernetes code (the dispatcher's resident memory, bench/README.md).
_COMMANDS = {
    "pkg": "mayfly.cli.pkg:pkg",
    "devices": "mayfly.cli.devices:devices",
    "report": "mayfly.cli.report:report",
    "up": "mayfly.cli.runtime:up",
    "publish": "mayfly.cli.runtime:publish",
    "demo": "mayfly.cli.demo:demo",
    "deploy": "mayfly.cli.deploy:deploy",
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
