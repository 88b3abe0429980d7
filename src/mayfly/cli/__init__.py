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
from mayfly.cli.demo import demo
from mayfly.cli.deploy import deploy
from mayfly.cli.devices import devices
from mayfly.cli.pkg import pkg
from mayfly.cli.report import report
from mayfly.cli.runtime import publish, up

__all__ = ["cli", "main"]


@click.group(cls=MayflyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mayfly")
def cli() -> None:
    """Mayfly runs actions against fleets of devices without a persistent coordinator.

    Task requests are CloudEvents; for each one a short-lived coordinator
    fetches the signed task package, runs it on the devices, reports and exits.
    """


cli.add_command(pkg)
cli.add_command(devices)
cli.add_command(report)
cli.add_command(up)
cli.add_command(publish)
cli.add_command(demo)
cli.add_command(deploy)


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="mayfly", standalone_mode=True))
