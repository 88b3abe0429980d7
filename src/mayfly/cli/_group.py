"""The ``mayfly`` command group: lazy commands, and errors as one line and an exit status.

Kept apart from :mod:`mayfly.cli._common` (settings and their flags): ``mayfly
--help`` then imports neither the settings nor the event models behind them.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from mayfly.errors import ConfigError, MayflyError

__all__ = ["MayflyGroup", "fail"]

_HINTS: dict[str, str] = {
    "IntegrityError": "the package was refused; do not run it. Re-publish from a trusted build.",
    "SigningKeyError": "create a key with `mayfly pkg keygen` or point "
    "MAYFLY_SIGNING_KEY/--key at one.",
    "PackageNotFoundError": "see what exists with `mayfly pkg list`.",
    "ImmutableVersionError": "published bytes stay as they are; bump the version.",
    "StoreError": "check the store location and that the server is reachable.",
}


class MayflyGroup(click.Group):
    """A click group that turns :class:`MayflyError` into a message and an exit status.

    ``lazy_commands`` maps command names to ``("module:attribute", short help)``:
    a command is imported when it runs or its own help is asked for; the
    group's ``--help`` lists it by that short help, importing nothing.
    """

    def __init__(
        self,
        *args: Any,
        lazy_commands: dict[str, tuple[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, tuple[str, str]] = dict(lazy_commands or {})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        # As click cuts them: the width left beside the longest name.
        limit = formatter.width - 6 - max((len(n) for n in names), default=0)
        rows = []
        for name in names:
            if name in self._lazy:
                # Cut as click cuts a command's own help (a stand-in command, nothing imported).
                stand_in = click.Command(name, help=self._lazy[name][1])
                rows.append((name, stand_in.get_short_help_str(limit)))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            target = self._lazy[cmd_name][0]
            module, _, attribute = target.partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{target} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MayflyError as exc:
            fail(exc)


def fail(exc: MayflyError) -> None:
    """Print what went wrong and what to do, then exit: 2 for a configuration
    error (one line: it names the setting), else 1."""
    # An error met in the warm parent comes back as a RuntimeStartError that
    # names its kind: the same hint as if it had been met here.
    kind = getattr(exc, "kind", None) or type(exc).__name__
    label = "refused" if kind == "IntegrityError" else "error"
    click.secho(f"{label}: {exc}", err=True, fg="red")
    if isinstance(exc, ConfigError):
        raise SystemExit(2)
    hint = _HINTS.get(kind)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    raise SystemExit(1)
