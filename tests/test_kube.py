"""The `kube` service is a real Kubernetes API server that validates Knative objects.

Server-side dry runs (``dry_run="All"``) with strict field validation check an object
against the real CRD schemas and store nothing, so these tests leave the server as they
found it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

NAMESPACE = "mayfly"  # created by the kube service, the kubeconfig's default namespace


@pytest.fixture(scope="module")
def api(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield api_client
    finally:
        api_client.close()


def _service(**template_spec: Any) -> dict[str, Any]:
    spec = {"containers": [{"image": "example.com/mayfly/coordinator:1"}], **template_spec}
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "reboot"},
        "spec": {"template": {"spec": spec}},
    }


def _dry_run_create(api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    group, version = obj["apiVersion"].split("/")
    plural = f"{obj['kind'].lower()}s"
    result: dict[str, Any] = client.CustomObjectsApi(api).create_namespaced_custom_object(
        group, version, NAMESPACE, plural, obj, dry_run="All", field_validation="Strict"
    )
    return result


def _rejection(api: client.ApiClient, obj: dict[str, Any]) -> tuple[int, str]:
    with pytest.raises(ApiException) as raised:
        _dry_run_create(api, obj)
    return raised.value.status, json.loads(raised.value.body)["message"]


def test_a_valid_knative_service_is_accepted(api: client.ApiClient) -> None:
    service = _service(containerConcurrency=1, timeoutSeconds=600)

    created = _dry_run_create(api, service)

    assert created["metadata"]["name"] == "reboot"
    assert created["metadata"]["namespace"] == NAMESPACE
    assert created["spec"]["template"]["spec"]["containerConcurrency"] == 1


def test_a_value_of_the_wrong_type_is_rejected_naming_the_field(api: client.ApiClient) -> None:
    status, message = _rejection(api, _service(containerConcurrency="one"))

    if "admission webhook" in message:
        # With Knative's webhooks running (the `knative` service), Serving's decodes the
        # object before the schema is checked, and refuses it first.
        assert status == 400
        assert "template.spec.containerConcurrency of type int64" in message
    else:
        assert status == 422
        assert "spec.template.spec.containerConcurrency" in message
        assert "must be of type integer" in message


def test_a_misspelt_field_is_rejected_naming_it(api: client.ApiClient) -> None:
    status, message = _rejection(api, _service(containerConcurency=1))

    assert status == 400
    assert 'unknown field "spec.template.spec.containerConcurency"' in message


def test_every_crd_in_the_folder_is_served(api: client.ApiClient, knative_crds: Path) -> None:
    in_folder = {path.stem for path in knative_crds.glob("*.yaml")}
    served = {
        crd.metadata.name
        for crd in client.ApiextensionsV1Api(api).list_custom_resource_definition().items
    }

    assert {
        "services.serving.knative.dev",
        "triggers.eventing.knative.dev",
        "kafkasources.sources.knative.dev",
        "kafkasinks.eventing.knative.dev",
        "jobsinks.sinks.knative.dev",
    } <= in_folder
    assert in_folder <= served


def test_kustomize_output_is_validated_by_the_server(
    api: client.ApiClient, kustomize_bin: Path, tmp_path: Path
) -> None:
    (tmp_path / "service.yaml").write_text(yaml.safe_dump(_service(containerConcurrency=1)))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["service.yaml"], "namePrefix": "mayfly-"})
    )

    built = subprocess.run(
        [str(kustomize_bin), "build", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    (service,) = yaml.safe_load_all(built.stdout)

    assert service["metadata"]["name"] == "mayfly-reboot"
    assert _dry_run_create(api, service)["metadata"]["name"] == "mayfly-reboot"
