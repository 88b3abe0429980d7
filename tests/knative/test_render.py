"""`mayfly deploy` without a cluster: what it renders from a package manifest."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from mayfly.cli import cli
from mayfly.deploy import DeployOptions, kn_command, render_task
from mayfly.errors import DeployError
from mayfly.events import Priority
from mayfly.packages.manifest import load_manifest

ROOT = Path(__file__).parents[2]
TASKPKGS = ROOT / "taskpkgs"
BASE = ROOT / "knative" / "base"
Run = Callable[..., Result]


@pytest.fixture
def mayfly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("MAYFLY_HOME", str(tmp_path / "home"))
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert (result.exit_code == 0) == ok, result.output
        assert "Traceback" not in result.output
        return result

    return run


def test_reboot_scales_to_zero_one_request_per_instance_with_the_packages_timeouts() -> None:
    manifest = load_manifest(TASKPKGS / "reboot")
    service, *triggers = render_task(manifest)

    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    template = service["spec"]["template"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] == "0"
    spec = template["spec"]
    assert spec["containerConcurrency"] == 1
    # timeout_s 120 in the manifest, plus the margin for fetching and delivering.
    assert manifest.limits.timeout_s == 120
    assert spec["timeoutSeconds"] == spec["responseStartTimeoutSeconds"] == 150
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TASK_TYPE"] == "reboot"
    assert env["FUNCTION_TARGET"] == "coordinator"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["memory"] == f"{256 + 8 * 128}Mi"

    assert [t["spec"]["broker"] for t in triggers] == [f"mayfly-{p.value}" for p in Priority]
    for trigger in triggers:
        assert trigger["spec"]["filter"]["attributes"] == {
            "type": "dev.mayfly.task.requested",
            "tasktype": "reboot",
        }
        assert trigger["spec"]["subscriber"]["ref"]["name"] == "reboot"
        assert trigger["spec"]["delivery"]["deadLetterSink"]["ref"]["name"] == "mayfly-deadletter"


def test_a_task_longer_than_a_revision_may_run_becomes_a_jobsink() -> None:
    manifest = load_manifest(TASKPKGS / "firmware-update")
    assert manifest.limits.timeout_s == 600
    jobsink, *triggers = render_task(manifest)

    assert jobsink["kind"] == "JobSink"
    job = jobsink["spec"]["job"]["spec"]
    assert job["activeDeadlineSeconds"] == 630
    (container,) = job["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "mayfly.coordinator"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "K_EVENT_PATH" not in env  # JobSink sets it, after the container's own
    assert env["MAYFLY_RESULT_SINK"].endswith("/mayfly/mayfly-results")
    assert {t["spec"]["subscriber"]["ref"]["kind"] for t in triggers} == {"JobSink"}

    with pytest.raises(DeployError, match="max-revision-timeout-seconds 600"):
        render_task(manifest, DeployOptions(shape="service"))
    # A cluster whose revisions may run longer takes it as a Service.
    (service, *_) = render_task(manifest, DeployOptions(max_revision_timeout_s=900))
    assert service["kind"] == "Service"


def test_runtime_class_goes_into_the_pod_spec() -> None:
    manifest = load_manifest(TASKPKGS / "reboot")
    service, *_ = render_task(manifest, DeployOptions(runtime_class="kata-qemu-snp"))
    assert service["spec"]["template"]["spec"]["runtimeClassName"] == "kata-qemu-snp"


def test_the_committed_task_files_are_what_mayfly_deploy_renders_today() -> None:
    for folder in sorted(p for p in TASKPKGS.iterdir() if (p / "manifest.json").is_file()):
        committed = BASE / "tasks" / f"{folder.name}.yaml"
        assert committed.is_file(), f"{committed} missing: mayfly deploy {folder} -o {BASE}/tasks"
        rendered = render_task(load_manifest(folder))
        assert list(yaml.safe_load_all(committed.read_text())) == rendered, (
            f"{committed} is stale: regenerate it with "
            f"`mayfly deploy taskpkgs/{folder.name} -o knative/base/tasks`"
        )


def test_cli_renders_yaml_writes_a_folder_and_prints_the_kn_command(
    mayfly: Run, tmp_path: Path
) -> None:
    out = mayfly("deploy", str(TASKPKGS / "reboot"), "--max-scale", "4").output
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Service", "Trigger", "Trigger", "Trigger"]
    annotations = docs[0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/max-scale"] == "4"
    assert "&id" not in out  # no YAML anchors

    mayfly("deploy", str(TASKPKGS / "reboot"), "-o", str(tmp_path / "out"))
    assert list(yaml.safe_load_all((tmp_path / "out" / "reboot.yaml").read_text())) == (
        render_task(load_manifest(TASKPKGS / "reboot"))
    )

    argv = shlex.split(mayfly("deploy", str(TASKPKGS / "reboot"), "--print-kn").output)
    assert argv == kn_command(load_manifest(TASKPKGS / "reboot"))
    assert argv[:4] == ["kn", "service", "create", "reboot"]


def test_cli_deploys_a_published_version_and_refuses_what_is_not_there(
    mayfly: Run, tmp_path: Path
) -> None:
    mayfly("pkg", "keygen")
    mayfly("pkg", "publish", str(TASKPKGS / "reboot"))
    out = mayfly("deploy", "reboot", "--version", "1.0.0").output
    service = next(yaml.safe_load_all(out))
    assert service["metadata"]["annotations"]["mayfly.dev/package-version"] == "1.0.0"

    missing = mayfly("deploy", "reboot", "--version", "9.9.9", ok=False)
    assert "reboot" in missing.output
    assert "9.9.9" in missing.output
    unknown = mayfly("deploy", "no-such-task", ok=False)
    assert "no-such-task" in unknown.output
    both = mayfly("deploy", "reboot", "--version", "1.0.0", "--channel", "stable", ok=False)
    assert "not both" in both.output
    nowhere = mayfly("deploy", str(tmp_path / "nowhere/x"), ok=False)
    assert "manifest.json" in nowhere.output


def test_an_image_build_bakes_the_signed_package_and_the_service_reads_it_there(
    mayfly: Run, tmp_path: Path
) -> None:
    mayfly("pkg", "keygen")
    mayfly("pkg", "publish", str(TASKPKGS / "reboot"))
    build = tmp_path / "image"
    rendered = mayfly("deploy", "reboot", "--image-build", str(build))
    service = next(yaml.safe_load_all(rendered.stdout))
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "mayfly/reboot:1.0.0"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MAYFLY_STORE"] == "/opt/mayfly/store"
    containerfile = (build / "Containerfile").read_text()
    assert "FROM mayfly/functions:" in containerfile
    assert "COPY store /opt/mayfly/store" in containerfile
    # The baked store is a store: the same trusted keys verify the package from it.
    from mayfly.app.wiring import open_repository
    from mayfly.settings import Settings

    settings = Settings.from_env(
        {"MAYFLY_HOME": str(tmp_path / "home"), "MAYFLY_STORE": str(build / "store")}
    )
    fetched = open_repository(settings).fetch("reboot")
    assert fetched.manifest.version == "1.0.0"
    assert fetched.digest in containerfile
    # A folder is no published version, and a full folder is not written over.
    mayfly("deploy", str(TASKPKGS / "reboot"), "--image-build", str(tmp_path / "x"), ok=False)
    again = mayfly("deploy", "reboot", "--image-build", str(build), ok=False)
    assert "is not empty" in again.output
