"""Fixtures of the tests against the test API server (and Knative's webhooks)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from mayfly.deploy.kube import KubeTarget, open_cluster

NAMESPACES = ["mayfly", "knative-serving", "knative-eventing", "observability"]


@pytest.fixture(scope="module")
def cluster(kubeconfig: Path) -> KubeTarget:
    """The test API server, with the namespaces the manifests use (dry runs need them)."""
    core = kube_client.CoreV1Api(kube_config.new_client_from_config(str(kubeconfig)))
    for name in NAMESPACES:
        try:
            core.create_namespace({"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:  # already there from an earlier test
                raise
    return open_cluster(str(kubeconfig))


@pytest.fixture
def scratch_namespace(kubeconfig: Path) -> Iterator[str]:
    core = kube_client.CoreV1Api(kube_config.new_client_from_config(str(kubeconfig)))
    name = f"mayfly-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
