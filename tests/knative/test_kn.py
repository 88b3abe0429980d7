"""`mayfly deploy --print-kn` run by the real ``kn`` writes the Service `mayfly deploy` renders.

``kn`` v0.42.0 (built by the `knative` service) runs the printed command with ``--target``,
which writes the Service to a folder instead of a cluster. On every field kn has a flag
for, its Service must equal Mayfly's; the rest (envFrom, volumes, securityContext) kn
cannot express, and the docs say so. Then Knative's webhooks accept kn's Service too.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubernetes import client as kube_client
from kubernetes import config as kube_config

from mayfly.cli import cli

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"
SERVICE_TASKS = ["reboot", "config-push"]  # firmware-update runs as a JobSink: kn makes none


def _mayfly(*argv: str) -> str:
    result = CliRunner().invoke(cli, list(argv), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _comparable(service: dict[str, Any]) -> dict[str, Any]:
    """The fields kn has flags for, as kn would write them."""
    template = service["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    annotations = template["metadata"].get("annotations", {})
    return {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "labels": service["metadata"].get("labels"),
        "template labels": template["metadata"].get("labels"),
        "scale": {k: v for k, v in annotations.items() if k.startswith("autoscaling.knative.dev")},
        "containerConcurrency": spec["containerConcurrency"],
        "timeoutSeconds": spec["timeoutSeconds"],
        "image": container["image"],
        # Plain values only: kn has no flag for valueFrom.
        "env": [(e["name"], e["value"]) for e in container.get("env", []) if "value" in e],
        "resources": container["resources"],
    }


@pytest.mark.parametrize("task", SERVICE_TASKS)
def test_kn_writes_the_service_mayfly_deploy_renders(
    task: str, kn_bin: Path, tmp_path: Path
) -> None:
    folder = str(TASKPKGS / task)
    printed = shlex.split(_mayfly("deploy", folder, "--print-kn"))
    assert printed[:4] == ["kn", "service", "create", task]
    done = subprocess.run(
        [str(kn_bin), *printed[1:], "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"Service '{task}' created in namespace 'mayfly'" in done.stdout
    written = yaml.safe_load((tmp_path / "mayfly" / "ksvc" / f"{task}.yaml").read_text())

    rendered = next(
        doc
        for doc in yaml.safe_load_all(_mayfly("deploy", folder))
        if doc and doc["kind"] == "Service"
    )
    assert _comparable(written) == _comparable(rendered)


def test_kns_service_is_accepted_by_knatives_webhooks(
    kn_bin: Path, kubeconfig: Path, knative_webhooks: Path, tmp_path: Path
) -> None:
    printed = shlex.split(_mayfly("deploy", str(TASKPKGS / "reboot"), "--print-kn"))
    subprocess.run(
        [str(kn_bin), *printed[1:], "--target", str(tmp_path)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    written = yaml.safe_load((tmp_path / "mayfly" / "ksvc" / "reboot.yaml").read_text())
    written.pop("status", None)
    api = kube_client.CustomObjectsApi(kube_config.new_client_from_config(str(kubeconfig)))
    answer = api.create_namespaced_custom_object(
        "serving.knative.dev", "v1", "mayfly", "services", written, dry_run="All"
    )
    spec = answer["spec"]["template"]["spec"]
    assert spec["containerConcurrency"] == 1
    assert spec["containers"][0]["readinessProbe"]["successThreshold"] == 1  # Serving's default


def test_print_kn_refuses_a_task_that_runs_as_a_jobsink() -> None:
    result = CliRunner().invoke(
        cli, ["deploy", str(TASKPKGS / "firmware-update"), "--print-kn"], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "firmware-update runs as a JobSink; kn creates Services only" in result.output
    assert "Traceback" not in result.output
