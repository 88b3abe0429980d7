"""One-layer OCI images written with the standard library, for the `cluster` service.

The one-node cluster has no registry to pull from: its images are OCI image archives made
here and imported into its containerd (``ctr images import``), named ``dev.local/...`` so
the kubelet never tries a pull (``imagePullPolicy: IfNotPresent``). Each image is one
uncompressed layer: a few Go binaries, or a Debian root file system with Mayfly installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
NONROOT = 65532
"""The user Knative's own images (distroless ``nonroot``) run as."""
_EPOCH = 0
"""Every file's mtime in a layer: the same inputs make the same image, digest and all."""


@dataclass(frozen=True)
class Image:
    """What goes into one image: its name, files, and how its container starts."""

    name: str
    """A full reference, e.g. ``dev.local/knative/activator:v0.50.0``."""
    files: Mapping[str, Path] = field(default_factory=dict)
    """Path in the image (no leading /) -> file on this machine, copied with its mode."""
    rootfs: Path | None = None
    """A whole tree to start from (a debootstrapped system); ``files`` go on top."""
    entrypoint: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    user: str = f"{NONROOT}:{NONROOT}"
    workdir: str = "/"


def write_archive(image: Image, archive: Path) -> str:
    """Write ``image`` as an OCI image archive at ``archive``; return its manifest digest."""
    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        layer = Path(scratch) / "layer.tar"
        _write_layer(image, layer)
        layer_digest, layer_size = _digest_file(layer)
        config = _json(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "User": image.user,
                    "Env": [f"{k}={v}" for k, v in image.env.items()],
                    "Entrypoint": list(image.entrypoint),
                    "WorkingDir": image.workdir,
                },
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            }
        )
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": _descriptor(CONFIG, config),
                "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer_size}],
            }
        )
        manifest_descriptor = _descriptor(MANIFEST, manifest)
        manifest_descriptor["annotations"] = {
            "io.containerd.image.name": image.name,
            "org.opencontainers.image.ref.name": image.name.rsplit(":", 1)[-1],
        }
        index = _json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [manifest_descriptor]})
        partial = archive.with_name(archive.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as out:
            _add_bytes(out, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(out, "index.json", index)
            for blob in (config, manifest):
                _add_bytes(out, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
            info = out.gettarinfo(str(layer), f"blobs/sha256/{layer_digest.split(':')[1]}")
            info.mtime, info.uid, info.gid, info.uname, info.gname = _EPOCH, 0, 0, "", ""
            with layer.open("rb") as source:
                out.addfile(info, source)
        partial.replace(archive)
    return str(manifest_descriptor["digest"])


def _write_layer(image: Image, layer: Path) -> None:
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as out:
        if image.rootfs is not None:
            for root, dirs, names in os.walk(image.rootfs):
                dirs.sort()
                for name in sorted(dirs) + sorted(names):
                    path = Path(root) / name
                    info = out.gettarinfo(str(path), str(path.relative_to(image.rootfs)))
                    info.mtime = _EPOCH
                    if info.isreg():
                        with path.open("rb") as data:
                            out.addfile(info, data)
                    else:
                        out.addfile(info)
        else:
            for folder, mode in (("etc", 0o755), ("tmp", 0o1777), ("home/nonroot", 0o755)):
                _add_dir(out, folder, mode)
            _add_bytes(
                out,
                "etc/passwd",
                f"root:x:0:0::/root:/sbin/nologin\n"
                f"nonroot:x:{NONROOT}:{NONROOT}::/home/nonroot:/sbin/nologin\n".encode(),
            )
            _add_bytes(out, "etc/group", f"root:x:0:\nnonroot:x:{NONROOT}:\n".encode())
            bundle = Path("/etc/ssl/certs/ca-certificates.crt")
            if bundle.is_file():  # Knative's controllers speak TLS to the API server
                _add_bytes(out, "etc/ssl/certs/ca-certificates.crt", bundle.read_bytes())
        made: set[str] = set()
        for target, source in sorted(image.files.items()):
            parts = target.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folder = "/".join(parts[:depth])
                if folder not in made and image.rootfs is None:
                    _add_dir(out, folder, 0o755)
                made.add(folder)
            info = out.gettarinfo(str(source), target)
            info.mtime, info.uid, info.gid, info.uname, info.gname = _EPOCH, 0, 0, "", ""
            with source.open("rb") as content:
                out.addfile(info, content)


def _add_dir(out: tarfile.TarFile, name: str, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, _EPOCH
    out.addfile(info)


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, _EPOCH
    out.addfile(info, io.BytesIO(data))


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, blob: bytes) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": f"sha256:{hashlib.sha256(blob).hexdigest()}",
        "size": len(blob),
    }


def _digest_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}", path.stat().st_size
