"""``mayfly deploy``: a task type's Knative resources, rendered or applied."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, cast

import click
import yaml

from mayfly import __version__
from mayfly.app.wiring import open_repository
from mayfly.cli._common import PACKAGE_SETTINGS, complete_tasks, settings_options
from mayfly.deploy import (
    DEFAULT_IMAGE,
    DeployOptions,
    Resource,
    describe,
    kn_command,
    render_task,
)
from mayfly.deploy.render import Shape
from mayfly.errors import DeployError
from mayfly.packages.manifest import MANIFEST_FILE, Manifest, load_manifest
from mayfly.settings import DEFAULT_SHARD_SIZE, Settings

__all__ = ["deploy", "dump_yaml"]


class _NoAliases(yaml.SafeDumper):
    """Repeated label dicts as plain copies: anchors and aliases confuse readers and kn."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _image_build(
    task: str, ref: str | None, image: str, folder: Path, settings: Settings
) -> tuple[str, str]:
    """Write TASK's image build; the image the Service runs, and its store."""
    from mayfly.app.wiring import load_trusted_keys
    from mayfly.deploy.image import IMAGE_STORE, write_image_build

    if (Path(task) / MANIFEST_FILE).is_file():
        raise click.UsageError("--image-build bakes a published version: `mayfly pkg publish` it")
    fetched = open_repository(settings).fetch(task, ref)
    m = fetched.manifest
    own = image if image != DEFAULT_IMAGE else f"mayfly/{m.name}:{m.version}"
    written = write_image_build(fetched, load_trusted_keys(settings), folder, DEFAULT_IMAGE)
    click.echo(f"{m.name} {m.version}: wrote {written} and {folder / 'store'}", err=True)
    click.echo(
        f"build it: podman build -t {own} {folder} (then push it where the cluster pulls)",
        err=True,
    )
    return own, IMAGE_STORE


def dump_yaml(resources: list[Resource]) -> str:
    """Multi-document YAML, keys in the order Kubernetes users expect (as rendered)."""
    return yaml.dump_all(resources, Dumper=_NoAliases, sort_keys=False, default_flow_style=False)


def _manifest(task: str, version: str | None, channel: str | None, settings: Settings) -> Manifest:
    folder = Path(task)
    if (folder / MANIFEST_FILE).is_file():
        # A package folder: what `mayfly pkg build` would build. Handy before publishing;
        # the coordinator still fetches and verifies the signed package at run time.
        if version or channel:
            raise click.UsageError("--version/--channel name a published package, not a folder")
        return load_manifest(folder)
    if "/" in task:
        raise DeployError(f"{task}: no {MANIFEST_FILE} there, and it is not a task name")
    # Fetched, not just read: a package that fails its signature is not deployed.
    return open_repository(settings).fetch(task, version or channel).manifest


@click.command()
@click.argument("task", shell_complete=complete_tasks)
@click.option("--version", help="Deploy this published version's limits (default: stable).")
@click.option("--channel", help="Deploy the version this channel points at.")
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write TASK.yaml into this folder instead of printing it.",
)
@click.option("--apply", "apply_", is_flag=True, help="Apply to the cluster (server-side apply).")
@click.option("--dry-run", is_flag=True, help="With --apply: have the API server check only.")
@click.option("--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).")
@click.option("--context", help="Kubeconfig context (default: the current one).")
@click.option("--namespace", "-n", default="mayfly", show_default=True)
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The functions image.")
@click.option("--max-scale", type=click.IntRange(min=1), default=10, show_default=True)
@click.option(
    "--max-processes",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Task processes per coordinator instance.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=DEFAULT_SHARD_SIZE,
    show_default=True,
    help="Devices one instance runs at most; a larger request runs in shards.",
)
@click.option("--runtime-class", help="runtimeClassName, e.g. kata-qemu-snp (confidential).")
@click.option(
    "--as",
    "shape",
    type=click.Choice(["service", "job"]),
    help="Knative Service or JobSink (default: by the package's timeout).",
)
@click.option(
    "--max-revision-timeout",
    type=click.IntRange(min=1),
    default=600,
    show_default=True,
    help="The cluster's max-revision-timeout-seconds.",
)
@click.option("--print-kn", is_flag=True, help="Print the equivalent `kn service create`.")
@click.option(
    "--image-build",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR: a Containerfile of TASK's own image (the functions image with its "
    "signed package baked in) and the store it copies; the Service then runs that image "
    "(--image, default mayfly/TASK:VERSION) and reads the package from it.",
)
@settings_options(*PACKAGE_SETTINGS)
def deploy(
    task: str,
    version: str | None,
    channel: str | None,
    output: Path | None,
    apply_: bool,
    dry_run: bool,
    kubeconfig: str | None,
    context: str | None,
    namespace: str,
    image: str,
    max_scale: int,
    max_processes: int,
    shard_size: int,
    runtime_class: str | None,
    shape: str | None,
    max_revision_timeout: int,
    print_kn: bool,
    image_build: Path | None,
    settings: Settings,
) -> None:
    """Render the Knative resources for TASK, a published task type (or a package folder).

    A Knative Service (scale to zero, one request per instance, timeouts from the
    package's limits) and one Trigger per priority lane; a JobSink instead when the
    package's timeout does not fit in a revision. They rely on knative/base being
    installed in the namespace (see knative/README.md).
    """
    if version and channel:
        raise click.UsageError("give --version or --channel, not both")
    if dry_run and not apply_:
        raise click.UsageError("--dry-run goes with --apply")
    manifest = _manifest(task, version, channel, settings)
    store = None
    if image_build is not None:
        image, store = _image_build(task, version or channel, image, image_build, settings)
    options = DeployOptions(
        image=image,
        store=store,
        namespace=namespace,
        max_scale=max_scale,
        max_processes=max_processes,
        shard_size=shard_size,
        runtime_class=runtime_class,
        max_revision_timeout_s=max_revision_timeout,
        shape=cast("Shape | None", shape),  # click.Choice allows only those two
    )
    resources = render_task(manifest, options)
    if print_kn:
        click.echo(shlex.join(kn_command(manifest, options)))
        return
    if apply_:
        # Imported here: the kubernetes client costs most of a second (see mayfly.deploy).
        from mayfly.deploy.kube import open_cluster

        cluster = open_cluster(kubeconfig, context)
        for applied in cluster.apply(resources, dry_run=dry_run):
            click.echo(str(applied))
        return
    text = dump_yaml(resources)
    if output is None:
        click.echo(text, nl=False)
        return
    output.mkdir(parents=True, exist_ok=True)
    target = output / f"{manifest.name}.yaml"
    source = task if (Path(task) / MANIFEST_FILE).is_file() else f"{task} {manifest.version}"
    target.write_text(
        f"# Rendered by `mayfly deploy {source}` (Mayfly {__version__}) from the package's\n"
        "# manifest: change the manifest or the flags and render again, not this file.\n" + text
    )
    names = ", ".join(describe(r) for r in resources)
    click.echo(f"{manifest.name} {manifest.version}: wrote {target} ({names})", err=True)
