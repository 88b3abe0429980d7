"""knative/ and `mayfly deploy` against a real Kubernetes API server with Knative's CRDs.

The API server (built from its Go module, with etcd) has the CRDs of Knative
Serving, Eventing and eventing-kafka-broker installed at pinned versions (see
dev/services). Every object goes through a server-side apply dry run with
strict field validation: the server checks it against the CRD's schema, and a
mistyped or misspelt field is refused by name; Knative's admission webhooks
(the `knative` service) then judge them as a real Knative would (see
test_webhooks.py). No Knative controllers run, so what is checked is what the
API server accepts, not how Knative reconciles it.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from mayfly.cli import cli
from mayfly.deploy import Resource, describe
from mayfly.deploy.kube import KubeTarget
from mayfly.errors import DeployError

ROOT = Path(__file__).parents[2]
KNATIVE = ROOT / "knative"
TASKPKGS = ROOT / "taskpkgs"
BUILDS = ["knative/base", "knative/overlays/dev", "knative/overlays/prod", "knative/overlays/local"]
# The confidential overlay is accepted only once its prerequisites are in force:
# test_webhooks.py applies them first, as knative/README.md says.
BUILDS += ["knative/overlays/confidential/prerequisites", "observability"]


def kustomize_build(kustomize: Path, folder: Path) -> list[Resource]:
    done = subprocess.run(
        [str(kustomize), "build", str(folder)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"kustomize build {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.mark.parametrize("folder", BUILDS)
def test_every_object_of_every_build_is_accepted_by_the_api_server(
    folder: str, kustomize_bin: Path, cluster: KubeTarget
) -> None:
    objects = kustomize_build(kustomize_bin, ROOT / folder)
    assert objects, f"{folder} built nothing"
    # Raises DeployError naming the object and the field the API server refused.
    applied = cluster.apply(objects, dry_run=True)
    assert len(applied) == len(objects)


def test_overlays_set_what_they_promise(kustomize_bin: Path) -> None:
    def by_name(objects: list[Resource]) -> dict[str, Resource]:
        return {describe(o): o for o in objects}

    dev = by_name(kustomize_build(kustomize_bin, KNATIVE / "overlays" / "dev"))
    prod = by_name(kustomize_build(kustomize_bin, KNATIVE / "overlays" / "prod"))
    confidential = by_name(kustomize_build(kustomize_bin, KNATIVE / "overlays" / "confidential"))

    reboot = "Service mayfly/reboot"
    image = dev[reboot]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "localhost:5001/mayfly/functions:dev"
    assert "Secret mayfly/mayfly-s3" in dev
    assert prod["KafkaSink mayfly/mayfly-results"]["spec"]["replicationFactor"] == 3
    assert "Secret mayfly/mayfly-s3" not in prod  # created by the operator, never committed
    classes: dict[str, str | None] = {}
    for name, obj in confidential.items():
        # Coordinators only: the aggregator and the waker run no package code.
        role = obj["metadata"].get("labels", {}).get("mayfly.dev/role")
        if obj["kind"] == "Service" and role == "coordinator":
            classes[name] = obj["spec"]["template"]["spec"].get("runtimeClassName")
        if obj["kind"] == "JobSink":
            classes[name] = obj["spec"]["job"]["spec"]["template"]["spec"].get("runtimeClassName")
    # Every coordinator, as a Service or a JobSink, and not none of them.
    assert set(classes) >= {"Service mayfly/reboot", "JobSink mayfly/firmware-update"}
    assert set(classes.values()) == {"kata-qemu-snp"}, classes
    prerequisites = by_name(
        kustomize_build(kustomize_bin, KNATIVE / "overlays" / "confidential" / "prerequisites")
    )
    flags = prerequisites["ConfigMap knative-serving/config-features"]["data"]
    assert flags == {"kubernetes.podspec-runtimeclassname": "enabled"}
    assert prerequisites["RuntimeClass kata-qemu-snp"]["handler"] == "kata-qemu-snp"


QUEUE_PROXY_CPU_M = 25
"""What Knative Serving's queue-proxy sidecar requests per pod (config-deployment's
``queue-sidecar-cpu-request`` default)."""


def _cpu_m(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def test_the_dev_overlay_fits_a_two_core_node_at_full_scale(kustomize_bin: Path) -> None:
    # Every Mayfly pod the dev overlay can run at once (each Service at its max-scale,
    # one Job per JobSink in flight) requests at most one core: the node's other core
    # is Knative's, Kafka's and MinIO's.
    total, seen = 0, []
    for obj in kustomize_build(kustomize_bin, KNATIVE / "overlays" / "dev"):
        if obj["kind"] == "Service" and obj["apiVersion"].startswith("serving.knative.dev"):
            template = obj["spec"]["template"]
            pods = int(template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"])
            extra = QUEUE_PROXY_CPU_M
        elif obj["kind"] == "JobSink":
            template, pods, extra = obj["spec"]["job"]["spec"]["template"], 1, 0
        else:
            continue
        cpu = sum(_cpu_m(c["resources"]["requests"]["cpu"]) for c in template["spec"]["containers"])
        total += pods * (cpu + extra)
        seen.append(describe(obj))
    assert {"Service mayfly/aggregator", "Service mayfly/reboot"} <= set(seen)
    assert total <= 1000, f"{total}m of CPU requested by {seen}"


def _reboot_service(kustomize_bin: Path) -> Resource:
    objects = kustomize_build(kustomize_bin, KNATIVE / "overlays" / "dev")
    return copy.deepcopy(next(o for o in objects if describe(o) == "Service mayfly/reboot"))


def test_a_mistyped_field_is_refused_naming_the_object_and_the_field(
    kustomize_bin: Path, cluster: KubeTarget
) -> None:
    service = _reboot_service(kustomize_bin)
    service["spec"]["template"]["spec"]["containerConcurrency"] = "one"
    with pytest.raises(DeployError) as refused:
        cluster.apply([service], dry_run=True)
    message = str(refused.value)
    assert message.startswith("Service mayfly/reboot: ")
    assert "spec.template.spec.containerConcurrency" in message


def test_a_misspelt_field_is_refused_naming_the_object_and_the_field(
    kustomize_bin: Path, cluster: KubeTarget
) -> None:
    service = _reboot_service(kustomize_bin)
    spec = service["spec"]["template"]["spec"]
    spec["timeoutSecond"] = spec.pop("timeoutSeconds")
    with pytest.raises(DeployError) as refused:
        cluster.apply([service], dry_run=True)
    message = str(refused.value)
    assert message.startswith("Service mayfly/reboot: ")
    assert "spec.template.spec.timeoutSecond" in message


def test_mayfly_deploy_apply_creates_what_it_renders(
    kubeconfig: Path, scratch_namespace: str, cluster: KubeTarget
) -> None:
    runner = CliRunner()
    argv = ["deploy", str(TASKPKGS / "reboot"), "--apply", "--kubeconfig", str(kubeconfig)]
    argv += ["-n", scratch_namespace]
    result = runner.invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"applied serving.knative.dev/v1 Service {scratch_namespace}/reboot" in result.output
    assert result.output.count("applied eventing.knative.dev/v1 Trigger") == 3

    api = kube_client.CustomObjectsApi(kube_config.new_client_from_config(str(kubeconfig)))
    stored: dict[str, Any] = api.get_namespaced_custom_object(
        "serving.knative.dev", "v1", scratch_namespace, "services", "reboot"
    )
    template = stored["spec"]["template"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0"
    assert template["spec"]["containerConcurrency"] == 1
    assert template["spec"]["timeoutSeconds"] == 150
    trigger = api.get_namespaced_custom_object(
        "eventing.knative.dev", "v1", scratch_namespace, "triggers", "reboot-high"
    )
    assert trigger["spec"]["filter"]["attributes"]["tasktype"] == "reboot"

    # Applying again changes nothing and succeeds (server-side apply is idempotent).
    again = runner.invoke(cli, argv, catch_exceptions=False)
    assert again.exit_code == 0, again.output


def test_mayfly_deploy_apply_reports_a_refusal_without_a_traceback(
    kubeconfig: Path, cluster: KubeTarget
) -> None:
    argv = ["deploy", str(TASKPKGS / "reboot"), "--apply", "--kubeconfig", str(kubeconfig)]
    argv += ["-n", "no-such-namespace", "--dry-run"]
    result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "Service no-such-namespace/reboot" in result.output
    assert "not found" in result.output
