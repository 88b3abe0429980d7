"""Shared CLI plumbing: settings from flags and environment, error reporting."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mayfly.errors import MayflyError
from mayfly.settings import (
    ENV_HOME,
    ENV_S3_ENDPOINT,
    ENV_STORE,
    ENV_TRUSTED_KEYS,
    Settings,
)

__all__ = ["MayflyGroup", "fail", "settings_from", "settings_options"]

F = TypeVar("F", bound=Callable[..., Any])

_HINTS: dict[str, str] = {
    "IntegrityError": "the package was refused; do not run it. Re-publish from a trusted build.",
    "SigningKeyError": "create a key with `mayfly pkg keygen` or point "
    "MAYFLY_SIGNING_KEY/--key at one.",
    "PackageNotFoundError": "see what exists with `mayfly pkg list`.",
    "ImmutableVersionError": "published bytes stay as they are; bump the version.",
    "StoreError": "check the store location and that the server is reachable.",
    "ConfigError": "see `mayfly --help` for the environment variables.",
}


class MayflyGroup(click.Group):
    """A click group that turns :class:`MayflyError` into a message and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MayflyError as exc:
            fail(exc)


def fail(exc: MayflyError) -> None:
    """Print what went wrong and what to do, then exit 1."""
    label = "refused" if type(exc).__name__ == "IntegrityError" else "error"
    click.secho(f"{label}: {exc}", err=True, fg="red")
    hint = _HINTS.get(type(exc).__name__)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    raise SystemExit(1)


def settings_options(fn: F) -> F:
    """Flags mirroring the environment variables a package command reads."""
    fn = click.option(
        "--trusted",
        "trusted",
        multiple=True,
        type=click.Path(path_type=str),
        help=f"Trusted public key file or folder (repeatable). Env: {ENV_TRUSTED_KEYS}.",
    )(fn)
    fn = click.option(
        "--s3-endpoint", help=f"S3 endpoint URL for an s3:// store. Env: {ENV_S3_ENDPOINT}."
    )(fn)
    fn = click.option("--store", help=f"Package store: a folder or s3://BUCKET. Env: {ENV_STORE}.")(
        fn
    )
    fn = click.option(
        "--home", type=click.Path(path_type=str), help=f"Mayfly's folder. Env: {ENV_HOME}."
    )(fn)
    return fn


def settings_from(
    home: str | None = None,
    store: str | None = None,
    s3_endpoint: str | None = None,
    trusted: tuple[str, ...] = (),
) -> Settings:
    """Settings from the environment, with flags taking precedence."""
    env: dict[str, str] = dict(os.environ)
    if home:
        # --home moves every default under it, exactly as MAYFLY_HOME would.
        env[ENV_HOME] = home
    return Settings.from_env(env).replace(
        store=store,
        s3_endpoint=s3_endpoint,
        trusted_keys=tuple(Path(t) for t in trusted) or None,
    )
