"""A task type's own image: the functions image with its signed package
baked in (``mayfly deploy TASK --image-build DIR``).

The folder written holds a ``Containerfile`` and ``store/``, a package store
with the one published version (its archive, manifest and signature, as the
configured store has them, and the ``stable`` channel at it). The image is
built from the functions image, with that store at :data:`IMAGE_STORE`; the
rendered Service then sets ``MAYFLY_STORE`` to it, over ``mayfly-config``'s.
The coordinator still verifies the package against the cluster's trusted
keys before it runs it: baking moves the bytes, not the trust.
"""

from __future__ import annotations

from pathlib import Path

from mayfly import __version__
from mayfly.errors import DeployError
from mayfly.packages import BuiltPackage, PackageRepository
from mayfly.packages.repository import FetchedPackage
from mayfly.packages.signing import TrustedKeys
from mayfly.packages.store import LocalPackageStore

__all__ = ["IMAGE_STORE", "write_image_build"]

#: Where the baked store is in a task type's image.
IMAGE_STORE = "/opt/mayfly/store"


def write_image_build(
    fetched: FetchedPackage, trusted: TrustedKeys, folder: Path, base_image: str
) -> Path:
    """Write the build folder of ``fetched``'s image; the Containerfile's path.

    Raises:
        DeployError: the folder holds files already.
    """
    if folder.exists() and any(folder.iterdir()):
        raise DeployError(f"{folder} is not empty; give a new folder for the image build")
    m = fetched.manifest
    repo = PackageRepository(LocalPackageStore(folder / "store"), trusted)
    repo.publish(BuiltPackage(m, fetched.data, fetched.digest), fetched.signature)
    repo.promote(m.name, m.version, "stable")
    containerfile = folder / "Containerfile"
    containerfile.write_text(
        f"# Written by `mayfly deploy {m.name} --image-build` (Mayfly {__version__}): the\n"
        f"# functions image with {m.name} {m.version} ({fetched.digest}) baked in.\n"
        f"FROM {base_image}\n"
        f"COPY store {IMAGE_STORE}\n"
        f'LABEL dev.mayfly.task-type="{m.name}" dev.mayfly.package-version="{m.version}" '
        f'dev.mayfly.package-digest="{fetched.digest}"\n'
    )
    return containerfile
