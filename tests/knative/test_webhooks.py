"""knative/ and `mayfly deploy` through Knative's real admission webhooks.

The `knative` service (dev/services) runs the webhooks of Knative Serving, Eventing and
eventing-kafka-broker beside the test API server: every Knative object sent there, dry
runs included, is defaulted and validated by Knative's own code, and the CRDs whose
versions convert through a webhook convert through it. These tests hold Mayfly's manifests
to what a real Knative accepts, beyond the CRD schemas of test_cluster.py.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from mayfly.cli import cli
from mayfly.deploy import Resource, describe
from mayfly.deploy.kube import KubeTarget
from mayfly.errors import DeployError
from tests.knative.test_cluster import KNATIVE, kustomize_build

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"
CONFIDENTIAL = KNATIVE / "overlays" / "confidential"
RUNTIME_CLASS_FLAG = "kubernetes.podspec-runtimeclassname"

# Every test here needs Knative's webhooks serving the API server.
pytestmark = pytest.mark.usefixtures("knative_webhooks")


@pytest.fixture(scope="module")
def base(kustomize_bin: Path) -> dict[str, Resource]:
    return {describe(o): o for o in kustomize_build(kustomize_bin, KNATIVE / "base")}


def _refusal(cluster: KubeTarget, obj: Resource) -> str:
    with pytest.raises(DeployError) as refused:
        cluster.apply([obj], dry_run=True)
    return str(refused.value)


def _set(*path: str, value: Any) -> Callable[[Resource], None]:
    def change(obj: Resource) -> None:
        *parents, last = path
        node = obj
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


TEMPLATE_ANNOTATIONS = ("spec", "template", "metadata", "annotations")

# Each passes the CRD's schema; only Knative's own validation knows it is wrong.
REFUSED = [
    (
        "Service mayfly/reboot",
        _set("spec", "template", "spec", "timeoutSeconds", value=601),
        "validation.webhook.serving.knative.dev",
        "spec.template.spec.timeoutSeconds",
    ),
    (
        "Service mayfly/reboot",
        _set(*TEMPLATE_ANNOTATIONS, "autoscaling.knative.dev/min-scale", value="20"),
        "validation.webhook.serving.knative.dev",
        "max-scale",
    ),
    (
        "Service mayfly/reboot",
        _set("spec", "template", "spec", "runtimeClassName", value="kata-qemu-snp"),
        "validation.webhook.serving.knative.dev",
        "spec.template.spec.runtimeClassName",
    ),
    (
        "Trigger mayfly/reboot-high",
        _set("spec", "filters", value=[{"cesql": "tasktype = = 'reboot'"}]),
        "validation.webhook.eventing.knative.dev",
        "cesql",
    ),
    (
        "Trigger mayfly/reboot-high",
        _set("spec", "delivery", "backoffDelay", value="1s"),  # not ISO 8601
        "validation.webhook.eventing.knative.dev",
        "backoffDelay",
    ),
    (
        "KafkaSink mayfly/mayfly-results",
        _set("spec", "bootstrapServers", value=[]),
        "validation.webhook.kafka.eventing.knative.dev",
        "bootstrapServers",
    ),
]


@pytest.mark.parametrize(
    ("name", "change", "webhook", "field"),
    REFUSED,
    ids=[
        "timeout-over-600",
        "min-over-max-scale",
        "runtime-class-flag-off",
        "bad-cesql",
        "bad-backoff-delay",
        "no-bootstrap-servers",
    ],
)
def test_the_webhooks_refuse_what_the_schemas_let_pass_naming_the_field(
    base: dict[str, Resource],
    cluster: KubeTarget,
    name: str,
    change: Callable[[Resource], None],
    webhook: str,
    field: str,
) -> None:
    obj = copy.deepcopy(base[name])
    cluster.apply([obj], dry_run=True)  # as rendered: accepted
    change(obj)
    message = _refusal(cluster, obj)
    assert message.startswith(f"{name}: "), message
    assert webhook in message, message
    assert field in message, message


def test_knative_defaults_what_the_manifests_leave_out(
    kubeconfig: Path, knative_webhooks: Path, base: dict[str, Resource]
) -> None:
    api = kube_client.CustomObjectsApi(kube_config.new_client_from_config(str(kubeconfig)))
    source = copy.deepcopy(base["KafkaSource mayfly/mayfly-results"])
    created = api.create_namespaced_custom_object(
        "sources.knative.dev", "v1", "mayfly", "kafkasources", source, dry_run="All"
    )
    assert created["spec"]["initialOffset"] == "latest"
    service = copy.deepcopy(base["Service mayfly/reboot"])
    created = api.create_namespaced_custom_object(
        "serving.knative.dev", "v1", "mayfly", "services", service, dry_run="All"
    )
    container = created["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["successThreshold"] == 1  # Serving's defaults


def test_a_kafka_source_converts_between_versions_through_its_webhook(
    kubeconfig: Path, knative_webhooks: Path, base: dict[str, Resource], scratch_namespace: str
) -> None:
    api_client = kube_config.new_client_from_config(str(kubeconfig))
    crd = kube_client.ApiextensionsV1Api(api_client).read_custom_resource_definition(
        "kafkasources.sources.knative.dev"
    )
    assert crd.spec.conversion.strategy == "Webhook"
    storage = next(v.name for v in crd.spec.versions if v.storage)
    assert storage == "v1beta1"  # Mayfly writes v1: every write converts

    api = kube_client.CustomObjectsApi(api_client)
    source = copy.deepcopy(base["KafkaSource mayfly/mayfly-results"])
    source["metadata"]["namespace"] = scratch_namespace
    api.create_namespaced_custom_object(
        "sources.knative.dev", "v1", scratch_namespace, "kafkasources", source
    )
    for version in ("v1beta1", "v1"):
        read = api.get_namespaced_custom_object(
            "sources.knative.dev", version, scratch_namespace, "kafkasources", "mayfly-results"
        )
        assert read["apiVersion"] == f"sources.knative.dev/{version}"
        assert read["spec"]["topics"] == ["mayfly.results"]
        assert read["spec"]["consumerGroup"] == "mayfly-aggregator"


@pytest.fixture
def confidential_prerequisites(
    kubeconfig: Path, kustomize_bin: Path, cluster: KubeTarget
) -> Iterator[None]:
    """prerequisites/ applied for real, as the README says; removed afterwards, and
    waited for until the webhook sees the flag off again, for the other tests."""
    cluster.apply(kustomize_build(kustomize_bin, CONFIDENTIAL / "prerequisites"))
    api_client = kube_config.new_client_from_config(str(kubeconfig))
    try:
        yield
    finally:
        kube_client.CoreV1Api(api_client).patch_namespaced_config_map(
            "config-features", "knative-serving", {"data": {RUNTIME_CLASS_FLAG: None}}
        )
        kube_client.NodeV1Api(api_client).delete_runtime_class("kata-qemu-snp")
        probe = next(
            o
            for o in kustomize_build(kustomize_bin, CONFIDENTIAL)
            if describe(o) == "Service mayfly/reboot"
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                cluster.apply([probe], dry_run=True)
            except DeployError as exc:
                if "spec.template.spec.runtimeClassName" not in str(exc):
                    raise
                break  # refused for its runtimeClassName again
            assert time.monotonic() < deadline, "the webhook still sees the flag on after 15 s"
            time.sleep(0.2)


def test_the_confidential_overlay_needs_its_prerequisites_in_force_first(
    kustomize_bin: Path, cluster: KubeTarget, request: pytest.FixtureRequest
) -> None:
    overlay = kustomize_build(kustomize_bin, CONFIDENTIAL)
    assert not any(o["kind"] == "ConfigMap" and "features" in describe(o) for o in overlay)
    # Before them: every coordinator Service is refused for its runtimeClassName.
    message = _refusal(cluster, next(o for o in overlay if describe(o) == "Service mayfly/reboot"))
    assert "spec.template.spec.runtimeClassName" in message

    request.getfixturevalue("confidential_prerequisites")
    # The webhook sees the flag once its informer has the ConfigMap: moments later.
    deadline = time.monotonic() + 15
    while True:
        try:
            applied = cluster.apply(overlay, dry_run=True)
            break
        except DeployError as exc:
            if "runtimeClassName" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert len(applied) == len(overlay)


def test_mayfly_deploy_reports_a_webhook_refusal_naming_the_field(
    kubeconfig: Path, knative_webhooks: Path, cluster: KubeTarget
) -> None:
    # firmware-update's timeout is longer than a revision may run: forced into a Service
    # on a cluster whose limit is Knative's default 600 s, Knative refuses it.
    argv = ["deploy", str(TASKPKGS / "firmware-update"), "--as", "service"]
    argv += ["--max-revision-timeout", "3600", "--apply", "--dry-run"]
    argv += ["--kubeconfig", str(kubeconfig)]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "Service mayfly/firmware-update" in result.output
    assert "validation.webhook.serving.knative.dev" in result.output
    assert "spec.template.spec.timeoutSeconds" in result.output
