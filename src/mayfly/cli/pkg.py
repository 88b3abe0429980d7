"""``mayfly pkg``: build, sign, publish and inspect task packages."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import click

from mayfly.app.pkgcheck import probe_built
from mayfly.app.wiring import load_trusted_keys, open_repository
from mayfly.cli._common import PACKAGE_SETTINGS, settings_options
from mayfly.cli._requests import key_values, merged_params
from mayfly.cli.devices import declarations, declare_options
from mayfly.coordinator.pipeline import Outcome, exit_code_for, summarize
from mayfly.errors import IntegrityError, MayflyError, PackageError
from mayfly.events import TaskRejected
from mayfly.exitcodes import ExitCode
from mayfly.packages import (
    BuiltPackage,
    Signature,
    build_package,
    digest_of,
    extract_archive,
    generate_keypair,
    load_private_key,
    parse_ref,
    read_manifest_from_archive,
    sign_built,
    verify_package,
)
from mayfly.settings import Settings

__all__ = ["pkg"]


def _build_checked(folder: Path, settings: Settings) -> BuiltPackage:
    """Build a package folder, import its entrypoint in the sandbox, and say
    what the build found (on stderr: stdout is the command's answer)."""
    built = build_package(folder, wheel_cache=settings.wheel_cache)
    found = [*built.found, probe_built(built)]
    for line in found:
        click.echo(f"checked  {line}", err=True)
    return built


def _load_built(path: Path, settings: Settings) -> BuiltPackage:
    """A package folder is built (and checked); an archive is read as it is."""
    if path.is_dir():
        return _build_checked(path, settings)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read {path}: {exc.strerror}") from exc
    return BuiltPackage(read_manifest_from_archive(data), data, digest_of(data))


#: The package commands that sign also take the signing key.
_SIGNING_SETTINGS = (*PACKAGE_SETTINGS, "signing_key")


@click.group()
def pkg() -> None:
    """Build, sign, publish and inspect task packages.

    A package is a folder with a manifest.json and Python code. Typical flow:

    \b
      mayfly pkg keygen                       # once: a signing key, trusted locally
      mayfly pkg publish taskpkgs/reboot      # build + sign + publish (channel stable)
      mayfly pkg list                         # what is published
      mayfly pkg verify reboot@stable         # fetch and check digest + signature
    """


@pkg.command()
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the key pair.")
@click.option("--name", default="signing", show_default=True, help="File name stem of the keys.")
@click.option("--force", is_flag=True, help="Replace existing keys.")
@click.option("--no-trust", is_flag=True, help="Do not add the public key to the trusted keys.")
@settings_options(*PACKAGE_SETTINGS)
def keygen(out: Path | None, name: str, force: bool, no_trust: bool, settings: Settings) -> None:
    """Create an Ed25519 signing key pair.

    The private key is written with mode 0600; the public key is also copied
    into $MAYFLY_HOME/trusted so this machine accepts what it signs.
    """
    folder = out or settings.signing_key_path.parent
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    kid = generate_keypair(private, public, overwrite=force)
    click.echo(f"key id   {kid}")
    click.echo(f"private  {private}")
    click.echo(f"public   {public}")
    if not no_trust:
        trusted_dir = settings.home / "trusted"
        trusted_dir.mkdir(parents=True, exist_ok=True)
        (trusted_dir / f"{kid}.pub").write_bytes(public.read_bytes())
        click.echo(f"trusted  {trusted_dir / f'{kid}.pub'}")


@pkg.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Archive path to write.")
@settings_options(*PACKAGE_SETTINGS)
def build(folder: Path, output: Path | None, settings: Settings) -> None:
    """Build FOLDER into a deterministic .tar.gz and print its sha256.

    The same folder always gives the same bytes, whatever file times, owners or
    listing order: the digest identifies the code. The manifest's
    dependencies are resolved now (wheels for this Python and platform, from
    the package index, cached in $MAYFLY_HOME/cache/wheels) and carried
    inside the archive, under _deps/.

    Refused, with the file and line: a module that does not compile, an
    entrypoint that does not import in the task sandbox or cannot take the
    context alone, a params schema default or example that does not match
    it. What was checked is said on stderr.
    """
    built = _build_checked(folder, settings)
    target = output or Path(built.filename)
    target.write_bytes(built.data)
    click.echo(f"{built.digest}  {target}")


@pkg.command("sign")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@settings_options(*_SIGNING_SETTINGS)
def sign_cmd(archive: Path, settings: Settings) -> None:
    """Sign ARCHIVE, writing ARCHIVE.sig beside it."""
    built = _load_built(archive, settings)
    sig = sign_built(load_private_key(settings.signing_key_path), built)
    out = archive.with_name(archive.name + ".sig")
    out.write_bytes(sig.to_json())
    click.echo(f"signed {built.manifest.name} {built.manifest.version} with key {sig.key_id}")
    click.echo(f"wrote  {out}")


@pkg.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--channel",
    default="stable",
    show_default=True,
    help="Channel to point at this version ('' for none).",
)
@settings_options(*_SIGNING_SETTINGS)
def publish(source: Path, channel: str, settings: Settings) -> None:
    """Publish SOURCE (a package folder or a built archive) to the store.

    A folder is built and signed on the fly; an archive uses ARCHIVE.sig if it
    exists. Versions are immutable: the same bytes again is a no-op, other
    bytes under a published version are refused.
    """
    built = _load_built(source, settings)
    sig_file = source.with_name(source.name + ".sig")
    if source.is_file() and sig_file.exists():
        sig = Signature.from_json(sig_file.read_bytes())
    else:
        sig = sign_built(load_private_key(settings.signing_key_path), built)
    repo = open_repository(settings)
    result = repo.publish(built, sig)
    m = result.manifest
    verb = "published" if result.created else "already published (same bytes)"
    click.echo(f"{verb} {m.name} {m.version} {result.digest} to {repo.store.describe()}")
    if channel:
        previous = repo.promote(m.name, m.version, channel)
        if previous != m.version:
            click.echo(f"channel {channel}: {previous or '(new)'} -> {m.version}")


@pkg.command("list")
@click.argument("name", required=False)
@settings_options(*PACKAGE_SETTINGS)
def list_cmd(name: str | None, settings: Settings) -> None:
    """List published packages, or the versions of NAME with digests and channels."""
    repo = open_repository(settings)
    names = [name] if name else repo.packages()
    if not names:
        click.echo(f"no packages in {repo.store.describe()}")
        return
    for n in names:
        infos = repo.describe(n)
        if not infos:
            raise PackageError(f"no published versions in {repo.store.describe()}", package=n)
        for info in infos:
            on = f"  [{', '.join(info.channels)}]" if info.channels else ""
            click.echo(f"{info.name:<20} {info.version:<12} {info.digest}{on}")


@pkg.command()
@click.argument("name")
@click.argument("version")
@click.argument("channel")
@settings_options(*PACKAGE_SETTINGS)
def promote(name: str, version: str, channel: str, settings: Settings) -> None:
    """Point CHANNEL of package NAME at VERSION (which must verify)."""
    repo = open_repository(settings)
    previous = repo.promote(name, version, channel)
    click.echo(f"{name} channel {channel}: {previous or '(new)'} -> {version}")


@pkg.command()
@click.argument("target")
@click.option(
    "--sig",
    "sig_path",
    type=click.Path(path_type=Path),
    help="Signature file for an archive (default ARCHIVE.sig).",
)
@settings_options(*PACKAGE_SETTINGS)
def verify(target: str, sig_path: Path | None, settings: Settings) -> None:
    """Verify TARGET: an archive file, or NAME[@VERSION|@CHANNEL] in the store.

    Checks the archive's sha256 against the signed digest and the Ed25519
    signature against the trusted keys. Exits 1 and says why when refused.
    """
    trusted = load_trusted_keys(settings)
    path = Path(target)
    if path.is_file():
        sig_file = sig_path or path.with_name(path.name + ".sig")
        try:
            raw_sig = sig_file.read_bytes()
        except OSError as exc:
            raise IntegrityError(f"no signature: cannot read {sig_file}") from exc
        sig = Signature.from_json(raw_sig)
        manifest = verify_package(path.read_bytes(), sig, None, trusted)
        click.echo(f"ok {manifest.name} {manifest.version} {sig.digest} signed by {sig.key_id}")
        return
    name, ref = parse_ref(target)
    fetched = open_repository(settings).fetch(name, ref)
    m = fetched.manifest
    click.echo(f"ok {m.name} {m.version} {fetched.digest} signed by {fetched.signature.key_id}")


@pkg.command()
@click.argument("ref")
@click.option(
    "--to",
    "dest",
    type=click.Path(path_type=Path),
    help="Folder to extract into (default: the package cache).",
)
@settings_options(*PACKAGE_SETTINGS)
def fetch(ref: str, dest: Path | None, settings: Settings) -> None:
    """Fetch NAME[@VERSION|@CHANNEL], verify it, and extract it safely."""
    name, version = parse_ref(ref)
    fetched = open_repository(settings).fetch(name, version)
    path = (
        extract_archive(fetched.data, dest) if dest else fetched.materialise(settings.package_cache)
    )
    m = fetched.manifest
    click.echo(f"{m.name} {m.version} {fetched.digest} -> {path}")


def _folder_stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a change to a package folder changes: each file's path, size, mtime."""
    stamp = []
    for path in sorted(folder.rglob("*")):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        st = path.stat()
        stamp.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _show_outcome(outcome: Outcome) -> None:
    if isinstance(outcome, TaskRejected):
        click.echo(f"rejected   {outcome.code.value}: {outcome.reason}")
        return
    for device in outcome.devices:
        took = ""
        if device.started_at and device.finished_at:
            took = f" {(device.finished_at - device.started_at).total_seconds() * 1000:.0f} ms"
        said = (
            f"error {device.error}" if device.error else f"output {json.dumps(device.output)[:300]}"
        )
        click.echo(
            f"{device.device_id:<14} {device.status.value:<10} "
            f"{device.attempts} attempt(s){took}  {said}"
        )
    click.echo(summarize(outcome))


@pkg.command("run")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-d", "--device", "devices", multiple=True, help="Target device id (repeatable).")
@click.option("-s", "--selector", "selectors", multiple=True, help="Label selector KEY=VALUE.")
@click.option(
    "-p", "--param", "params", multiple=True, help="Param KEY=VALUE (VALUE is JSON if it parses)."
)
@click.option("--params", "params_json", help="All params as one JSON object.")
@click.option(
    "--sim",
    type=click.IntRange(1, 10_000),
    help="Run on this many simulated devices (sim-0001, ...) served for the run, "
    "instead of the configured inventory; all of them unless -d or -s say.",
)
@click.option("--watch", is_flag=True, help="Run again each time a file of FOLDER changes.")
@declare_options
@settings_options(*PACKAGE_SETTINGS, "inventory")
def run_cmd(
    folder: Path,
    devices: tuple[str, ...],
    selectors: tuple[str, ...],
    params: tuple[str, ...],
    params_json: str | None,
    sim: int | None,
    watch: bool,
    declare_file: Path | None,
    actions: tuple[str, ...],
    capabilities: tuple[str, ...],
    settings: Settings,
) -> None:
    """Run the package in FOLDER, unpublished, as a development run.

    It is built and checked as `pkg build` does, signed with a throwaway key
    into a throwaway store, and run by a coordinator and its sandboxed task
    processes exactly as a published version would be; the package's log
    lines and each device's result are printed here, and the result says
    mode "dev". Nothing goes to the store, the event log or the aggregator.

    \b
      mayfly pkg run taskpkgs/reboot --sim 3
      mayfly pkg run mypkg -d sim-0001 -p level=debug --watch
    """
    import logging
    import tempfile

    from mayfly.app.devrun import dev_run, simulated_inventory

    merged = merged_params(params_json, params)
    selector = key_values(selectors, "--selector")
    if not (devices or selector) and sim is None:
        raise click.UsageError("say which devices: -d ID, -s KEY=VALUE, or --sim N")
    if not (devices or selector):
        devices = tuple(f"sim-{n:04d}" for n in range(1, (sim or 0) + 1))
    task_log = logging.getLogger("mayfly.task")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("log        %(levelname)s %(message)s"))
    task_log.addHandler(handler)
    task_log.setLevel(logging.DEBUG)

    def once(inventory: Path) -> int:
        try:
            outcome = dev_run(
                settings,
                folder,
                inventory,
                devices=devices,
                selector=selector,
                params=merged,
                say=lambda line: click.echo(f"checked    {line}", err=True),
            )
        except MayflyError as exc:
            click.echo(f"error: {exc}", err=True)
            return int(ExitCode.CONFIG)
        _show_outcome(outcome)
        sys.stdout.flush()  # a pipe's reader (`| tee`) sees each run as it ends
        return int(exit_code_for(outcome))

    with (
        tempfile.TemporaryDirectory(prefix="mayfly-run-") as scratch,
        contextlib.ExitStack() as stack,
    ):
        if sim is not None:
            extra, caps = declarations(declare_file, actions, capabilities)
            try:
                served = simulated_inventory(sim, Path(scratch), actions=extra, capabilities=caps)
                inventory = stack.enter_context(served)
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from exc
        elif settings.inventory.startswith("s3://"):
            raise click.UsageError("pkg run reads a file inventory (--inventory FILE), or --sim N")
        else:
            inventory = Path(settings.inventory)
        # Stamped before each run: a change made while it runs (or as "watching"
        # is printed) starts the next one, never goes unseen.
        stamp = _folder_stamp(folder)
        code = once(inventory)
        while watch:
            click.echo(f"watching   {folder} for changes (Ctrl-C to stop)", err=True)
            while _folder_stamp(folder) == stamp:
                time.sleep(0.5)
            stamp = _folder_stamp(folder)
            code = once(inventory)
    raise SystemExit(code)


@pkg.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to make the package in.",
)
def new_cmd(name: str, parent: Path) -> None:
    """Make a new package folder NAME: manifest, code and a test to start from.

    \b
      mayfly pkg new hello
      mayfly pkg run hello --sim 3      # try it on three simulated devices
      python -m pytest hello            # its test does the same
      mayfly pkg publish hello          # sign and publish it
    """
    from mayfly.app.scaffold import new_package

    folder = new_package(parent, name)
    for path in sorted(folder.iterdir()):
        click.echo(f"wrote  {path}")
