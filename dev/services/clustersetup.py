"""The `cluster` service's setup step: apply Knative's manifests once the API server answers.

``python -m services.clustersetup OBJECTS.json KUBECONFIG DONE`` (a ``once`` child of
services/nsrelay.py, in the node's network namespace): waits for the API server's /readyz,
applies every object in OBJECTS.json (services/kubeapply.py: CRDs first, objects refused
while their webhook has no pod yet tried again), then creates the file DONE, which the
service's probe waits for. Exits non-zero, naming what was refused, if that takes too long.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from services import kubeapply
from services.kube import _https_request

READY_TIMEOUT_S = 120.0
APPLY_TIMEOUT_S = 420.0
"""Knative's webhooks start in a pod each, on 2 cores: their objects wait for them."""


def main(argv: list[str]) -> int:
    objects_file, kubeconfig_file, done = (Path(arg) for arg in argv)
    config = json.loads(kubeconfig_file.read_text())
    cluster = config["clusters"][0]["cluster"]
    server = urlsplit(cluster["server"])
    ca = Path(cluster["certificate-authority"])
    token = config["users"][0]["user"]["token"]

    def api(
        method: str, path: str, body: object = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        return _https_request(
            server.hostname or "",
            server.port or 443,
            path,
            ca=ca,
            token=token,
            timeout=10.0,
            method=method,
            body=body,
            content_type=content_type,
        )

    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if api("GET", "/readyz")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"clustersetup: no ready API server at {cluster['server']}", flush=True)
            return 1
        time.sleep(0.5)
    objects = json.loads(objects_file.read_text())
    started = time.monotonic()
    try:
        kubeapply.apply(api, objects, timeout=APPLY_TIMEOUT_S, what="Knative's manifests")
    except RuntimeError as exc:
        print(f"clustersetup: {exc}", flush=True)
        return 1
    print(f"clustersetup: {len(objects)} objects applied in {time.monotonic() - started:.0f}s")
    done.write_text("applied\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
