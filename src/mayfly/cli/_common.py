"""Shared CLI plumbing: settings from flags and environment, error reporting."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem

from mayfly.cli._group import MayflyGroup, fail
from mayfly.settings import Option, Settings, option

__all__ = [
    "PACKAGE_SETTINGS",
    "S3_SETTINGS",
    "MayflyGroup",
    "complete_devices",
    "complete_tasks",
    "dump",
    "fail",
    "load_settings",
    "output_option",
    "parse_duration",
    "settings_options",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Settings that reach an S3 server.
S3_SETTINGS = ("s3_endpoint", "s3_access_key", "s3_region")
#: Settings of the commands that read packages from the store.
PACKAGE_SETTINGS = ("home", "store", *S3_SETTINGS, "trusted_keys")


#: ``-o table|json|yaml`` of every command that reads something out.
output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="How to print: a table for people, JSON or YAML for scripts.",
)


def dump(value: Any, output: str) -> None:
    """Print ``value`` as ``output`` says: ``json`` or ``yaml``."""
    if output == "json":
        click.echo(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        import yaml  # only for -o yaml

        click.echo(yaml.safe_dump(value, sort_keys=False, allow_unicode=True), nl=False)


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d|w)\s*$")
_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "min": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}


def parse_duration(text: str) -> timedelta | None:
    """``90s``, ``15m``, ``24h``, ``7d``, ``2w``; None if ``text`` is not one."""
    match = _DURATION.match(text)
    if not match or int(match[1]) == 0:
        return None
    return int(match[1]) * _UNITS[match[2]]


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


# -- shell completion (``eval "$(_MAYFLY_COMPLETE=bash_source mayfly)"``) ------


def _completion_settings(ctx: click.Context) -> Settings:
    """The settings a command would run with: its flags given so far, then the environment."""
    flags = {
        key.removeprefix("setting_"): value
        for key, value in ctx.params.items()
        if key.startswith("setting_") and value is not None
    }
    return load_settings(flags)


def complete_tasks(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Task types published in the store the command would use."""
    try:
        from mayfly.app.wiring import open_repository

        names = open_repository(_completion_settings(ctx)).packages()
    except Exception:  # completion offers nothing rather than fail in the shell
        return []
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_devices(
    ctx: click.Context, _param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Device ids of the inventory the command would use (at most 200 shown)."""
    try:
        from mayfly.app.wiring import load_inventory

        ids = [d.id for d in load_inventory(_completion_settings(ctx))]
    except Exception:  # completion offers nothing rather than fail in the shell
        return []
    found = [i for i in ids if i.startswith(incomplete)][:200]
    return [CompletionItem(i) for i in found]
