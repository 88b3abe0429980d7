"""Knative's scale from zero: a request to Mayfly's coordinator Service when no pod runs.

On the one-node cluster of `make cluster-up` (``dev/services up cluster``): deploys a
Knative Service running Mayfly's image as the coordinator function, waits until Knative
has scaled it to zero, then sends one request through the ingress (Traefik, on loopback)
and times it to the first byte of the answer: the activator holding the request, a pod
scheduled and started (sandbox, two containers, the queue-proxy's readiness), Python and
functions-framework starting, the coordinator answering. Repeated ``--runs`` times, each
from zero. Beside it, `make bench` reports Mayfly's local cold start (a fork of a warm
parent) from the same run.

    python bench/knative.py [--runs 5] [--json out.json]

Without the cluster (MAYFLY_TEST_CLUSTER_* unset) it writes ``{"skipped": reason}``.
Bounded: --runs requests, each waiting at most 120 s for zero and 120 s for the answer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client, config

from mayfly.deploy.kube import KubeTarget

NAME, NAMESPACE = "bench-cold", "mayfly"
IMAGE = "dev.local/mayfly/functions:dev"
WAIT_S = 120.0


def _service() -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "labels": {"networking.knative.dev/visibility": "cluster-local"},
        },
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {
                        "autoscaling.knative.dev/min-scale": "0",
                        "autoscaling.knative.dev/max-scale": "1",
                    }
                },
                "spec": {
                    "containerConcurrency": 1,
                    "containers": [
                        {
                            "image": IMAGE,
                            "env": [{"name": "FUNCTION_TARGET", "value": "coordinator"}],
                            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                        }
                    ],
                },
            }
        },
    }


def _pods(core: client.CoreV1Api) -> int:
    pods = core.list_namespaced_pod(
        NAMESPACE, label_selector=f"serving.knative.dev/service={NAME}"
    ).items
    return sum(1 for p in pods if p.metadata is not None and p.metadata.deletion_timestamp is None)


def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"knative bench: {what} after {WAIT_S:.0f}s")
        time.sleep(0.5)


def _request(ingress: str) -> tuple[float, int]:
    """One POST through the ingress; (seconds to the first byte of the answer, status)."""
    where = urlsplit(ingress)
    conn = http.client.HTTPConnection(where.hostname or "", where.port or 80, timeout=WAIT_S)
    body = b"{}"  # not a CloudEvent: the coordinator answers at once (refused), once it runs
    started = time.perf_counter()
    try:
        conn.request(
            "POST",
            "/",
            body=body,
            headers={
                "Host": f"{NAME}.{NAMESPACE}.svc.cluster.local",
                "Content-Type": "application/json",
            },
        )
        response = conn.getresponse()
        elapsed = time.perf_counter() - started
        response.read()
        return elapsed, response.status
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kubeconfig = os.environ.get("MAYFLY_TEST_CLUSTER_KUBECONFIG")
    ingress = os.environ.get("MAYFLY_TEST_CLUSTER_INGRESS")
    if not kubeconfig or not ingress:
        result: dict[str, Any] = {"skipped": "no cluster: `make cluster-up` starts it"}
        print(f"knative: {result['skipped']}")
    else:
        api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        KubeTarget(api).apply([_service()])

        def ready() -> bool:
            obj = custom.get_namespaced_custom_object(
                "serving.knative.dev", "v1", NAMESPACE, "services", NAME
            )
            conditions = (obj.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        samples, statuses = [], []
        try:
            _until(ready, "the Service is not Ready")
            for run in range(args.runs):
                _until(lambda: _pods(core) == 0, "the Service did not scale to zero")
                elapsed, status = _request(ingress)
                samples.append(elapsed * 1000)
                statuses.append(status)
                print(f"knative: run {run + 1}: {elapsed * 1000:.0f} ms from zero (HTTP {status})")
        finally:
            custom.delete_namespaced_custom_object(
                "serving.knative.dev", "v1", NAMESPACE, "services", NAME
            )
            api.close()
        result = {
            "scale_from_zero": {
                "runs": len(samples),
                "p50_ms": round(statistics.median(samples), 1),
                "max_ms": round(max(samples), 1),
                "samples_ms": [round(s, 1) for s in samples],
                "statuses": statuses,
            }
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
