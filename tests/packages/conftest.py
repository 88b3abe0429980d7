from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mayfly.packages import TrustedKeys

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trusted(signing_key: Ed25519PrivateKey) -> TrustedKeys:
    return TrustedKeys([signing_key.public_key()])


@pytest.fixture
def pkg_folder(tmp_path: Path) -> Path:
    """A writable copy of the firmware-update example package."""
    dest = tmp_path / "firmware-update"
    shutil.copytree(TASKPKGS / "firmware-update", dest)
    return dest


def write_package(
    folder: Path,
    name: str = "demo",
    version: str = "1.0.0",
    code: str = "def run(ctx):\n    return 1\n",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "version": version, "entrypoint": "task:run"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "task.py").write_text(code)
    return folder
