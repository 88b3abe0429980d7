"""Shared CLI plumbing: settings from flags and environment, error reporting."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mayfly.cli._group import MayflyGroup, fail
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
