"""Shared CLI plumbing: settings from flags and environment, error reporting."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mayfly.errors import ConfigError, MayflyError
from mayfly.settings import Option, Settings, option

__all__ = [
    "PACKAGE_SETTINGS",
    "S3_SETTINGS",
    "MayflyGroup",
    "fail",
    "load_settings",
    "settings_options",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Settings that reach an S3 server.
S3_SETTINGS = ("s3_endpoint", "s3_access_key", "s3_region")
#: Settings of the commands that read packages from the store.
PACKAGE_SETTINGS = ("home", "store", *S3_SETTINGS, "trusted_keys")

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

    ``lazy_commands`` maps command names to ``"module:attribute"``: imported
    when the command is looked up (to run it, or for ``--help``), not before.
    """

    def __init__(
        self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module, _, attribute = self._lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
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


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    """Settings from the environment, with the given flags taking precedence.

    Raises:
        ConfigError: naming the variable or flag at fault.
    """
    return Settings.from_env(None, flags or {})


def _param(field: str) -> str:
    return f"setting_{field}"


def _click_option(opt: Option) -> Callable[[F], F]:
    assert opt.flag is not None
    text = f"{opt.help[0].upper()}{opt.help[1:]}. [env: {opt.env}; default: {opt.default}]"
    kinds: dict[str, dict[str, Any]] = {
        "text": {},
        "path": {"type": click.Path(path_type=str)},
        "count": {"type": click.IntRange(1, 256)},
        "paths": {"type": click.Path(path_type=str), "multiple": True},
    }
    return click.option(opt.flag, _param(opt.field), help=text, **kinds[opt.kind])


def settings_options(*fields: str) -> Callable[[F], F]:
    """Add the flags of these settings (from :data:`mayfly.settings.OPTIONS`) and
    hand the command one resolved ``settings: Settings`` instead of them.

    Every flag's help names its environment variable; a flag wins over it.
    """
    options = [option(f) for f in fields]

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            flags = {o.field: kwargs.pop(_param(o.field), None) for o in options if o.flag}
            return fn(*args, settings=load_settings(flags), **kwargs)

        for opt in reversed(options):
            if opt.flag is not None:
                command = _click_option(opt)(command)
        return command  # type: ignore[return-value]

    return decorate
