"""Mayfly on a real Knative: from Kafka to a coordinator scaled from zero to Jaeger.

On the one-node cluster of ``dev/services up cluster`` (``make cluster-test``), with the
``local`` overlay: ``mayfly publish`` writes a request to the lane topic on the host's
Kafka; the lane's bridge (a ContainerSource) hands it to the lane's Broker; the Trigger
of its task type delivers it to the Knative Service, which scales from zero; the
coordinator fetches the signed package from the host's S3, runs it against a device
simulator on the host, and writes its result to the results topic; the results bridge
delivers that to the aggregator Service, which exports the request's spans to Jaeger,
where Knative's own spans of the delivery are in the same trace.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from click.testing import CliRunner
from kubernetes import client, config

from mayfly.app.publishing import publish_folders
from mayfly.app.wiring import open_event_log
from mayfly.cli import cli
from mayfly.deploy.kube import KubeTarget
from mayfly.devices.sim import Simulator, SimulatorServer
from mayfly.events import TaskCompleted, from_kafka
from mayfly.settings import Settings

from ..conftest import JaegerServer, KnativeCluster, S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.s3, pytest.mark.jaeger]
ROOT = Path(__file__).parents[2]
NAMESPACE = "mayfly"
SIMULATOR_PORT = 18090
"""The port the `cluster` service relays from its node address to this machine."""
PACKAGES, CONFIG, ARCHIVE = "mayfly-packages", "mayfly-config", "mayfly-archive"
"""The overlay's buckets (knative/base/config.yaml, aggregator.yaml)."""


@dataclass
class Deployed:
    api: client.ApiClient
    settings: Settings
    simulator: Simulator
    bootstrap: str


@contextlib.contextmanager
def _buckets(s3: S3Server) -> Iterator[None]:
    """The overlay's buckets, new and empty (a killed run's are emptied), removed after."""
    minio = s3.client()

    def remove() -> None:
        for bucket in (PACKAGES, CONFIG, ARCHIVE):
            if minio.bucket_exists(bucket):
                for obj in minio.list_objects(bucket, recursive=True):
                    if obj.object_name is not None:
                        minio.remove_object(bucket, obj.object_name)
                minio.remove_bucket(bucket)

    remove()
    for bucket in (PACKAGES, CONFIG, ARCHIVE):
        minio.make_bucket(bucket)
    try:
        yield
    finally:
        remove()


@pytest.fixture(scope="module")
def deployed(
    knative_cluster: KnativeCluster,
    kafka_bootstrap: str,
    s3_server: S3Server,
    kustomize_bin: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    home = tmp_path_factory.mktemp("cluster-home")
    env = {
        "MAYFLY_HOME": str(home),
        "MAYFLY_STORE": f"s3://{PACKAGES}",
        "MAYFLY_INVENTORY": f"s3://{CONFIG}/inventory.json",
        "MAYFLY_S3_ENDPOINT": s3_server.endpoint,
        "MAYFLY_S3_ACCESS_KEY": s3_server.access_key,
        "MAYFLY_S3_SECRET_KEY": s3_server.secret_key,
        "MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}",
    }
    settings = Settings.from_env(env)
    stack = contextlib.ExitStack()
    stack.enter_context(_buckets(s3_server))
    publish_folders(settings, [ROOT / "taskpkgs" / "reboot", ROOT / "taskpkgs" / "firmware-update"])
    public_key = (home / "trusted" / "signing.pub").read_text()

    with stack, SimulatorServer(Simulator(3, reboot_time=0.05), port=SIMULATOR_PORT) as sim:
        # The pods reach the simulator at the node's address, not at this machine's loopback.
        inventory = (
            sim.inventory()
            .to_json()
            .replace(
                f"127.0.0.1:{SIMULATOR_PORT}".encode(),
                f"{knative_cluster.node}:{SIMULATOR_PORT}".encode(),
            )
        )
        s3_server.client().put_object(
            CONFIG, "inventory.json", io.BytesIO(inventory), len(inventory)
        )
        built = subprocess.run(
            [str(kustomize_bin), "build", str(ROOT / "knative" / "overlays" / "local")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        objects = [o for o in yaml.safe_load_all(built) if o]
        for obj in objects:
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "mayfly-trusted-keys":
                obj["data"] = {"signing.pub": public_key}
        api = config.new_client_from_config(config_file=str(knative_cluster.kubeconfig))
        KubeTarget(api).apply(objects)
        _wait_ready(api, timeout_s=240)
        try:
            yield Deployed(api, settings, sim.simulator, kafka_bootstrap)
        finally:
            custom = client.CustomObjectsApi(api)
            for group, version, plural, name in _READY:
                custom.delete_namespaced_custom_object(group, version, NAMESPACE, plural, name)
            api.close()


_READY = (
    ("serving.knative.dev", "v1", "services", "reboot"),
    ("serving.knative.dev", "v1", "services", "aggregator"),
    ("eventing.knative.dev", "v1", "brokers", "mayfly-normal"),
    ("eventing.knative.dev", "v1", "triggers", "reboot-normal"),
    ("eventing.knative.dev", "v1", "triggers", "firmware-update-normal"),
    ("sinks.knative.dev", "v1alpha1", "jobsinks", "firmware-update"),
    ("sources.knative.dev", "v1", "containersources", "mayfly-requests-normal"),
    ("sources.knative.dev", "v1", "containersources", "mayfly-results"),
)
"""What the test's path needs Ready (and deletes afterwards)."""


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _wait_ready(api: client.ApiClient, timeout_s: float) -> None:
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_s
    waiting: list[str] = []
    while time.monotonic() < deadline:
        waiting = [
            f"{plural}/{name}"
            for group, version, plural, name in _READY
            if not _ready(
                custom.get_namespaced_custom_object(group, version, NAMESPACE, plural, name)
            )
        ]
        if not waiting:
            return
        time.sleep(2)
    raise AssertionError(f"not Ready after {timeout_s:.0f}s: {', '.join(waiting)}")


def _pods(api: client.ApiClient, service: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(api).list_namespaced_pod(
        NAMESPACE, label_selector=f"serving.knative.dev/service={service}"
    )
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def _wait_for_zero(api: client.ApiClient, service: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _pods(api, service):
        if time.monotonic() > deadline:
            raise AssertionError(f"{service} did not scale to zero in {timeout_s:.0f}s")
        time.sleep(1)


def _jaeger_spans(
    jaeger: JaegerServer, trace_id: str, want: set[tuple[str, str]], timeout_s: float
) -> set[tuple[str, str]]:
    """The trace's (service, span name) pairs, once it holds all of ``want``: each
    component exports in batches of its own, so the trace fills in over seconds."""
    deadline = time.monotonic() + timeout_s
    spans: set[tuple[str, str]] = set()
    while time.monotonic() < deadline:
        response = requests.get(f"{jaeger.query_url}/api/traces/{trace_id}", timeout=5)
        if response.status_code == 200 and (data := response.json().get("data")):
            service_of = {key: p["serviceName"] for key, p in data[0]["processes"].items()}
            spans = {(service_of[s["processID"]], s["operationName"]) for s in data[0]["spans"]}
            if want <= spans:
                return spans
        time.sleep(1)
    raise AssertionError(
        f"trace {trace_id} in Jaeger after {timeout_s:.0f}s lacks {sorted(want - spans)}; "
        f"it has {sorted(spans)}"
    )


def _publish(deployed: Deployed, argv: list[str], jaeger: JaegerServer) -> tuple[str, str]:
    """``mayfly publish ARGV`` to the lane topic on the host's Kafka (checked against the
    store and inventory the cluster reads); returns the request id and its trace id."""
    settings = deployed.settings
    env = {"MAYFLY_HOME": str(settings.home), "MAYFLY_TOPIC_PREFIX": "mayfly"}
    env |= {
        "MAYFLY_STORE": f"s3://{PACKAGES}",
        "MAYFLY_INVENTORY": f"s3://{CONFIG}/inventory.json",
        "MAYFLY_S3_ENDPOINT": settings.s3_endpoint or "",
        "MAYFLY_S3_ACCESS_KEY": settings.s3_access_key or "",
        "MAYFLY_S3_SECRET_KEY": settings.s3_secret_key or "",
    }
    argv = ["publish", *argv, "--event-log", f"kafka://{deployed.bootstrap}"]
    argv += ["--otlp-endpoint", jaeger.otlp_endpoint]
    result = CliRunner(env=env).invoke(cli, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    request_id = result.output.split("published ", 1)[1].split()[0]
    return request_id, result.output.split(" trace ")[1].strip()


def _result(
    deployed: Deployed, request_id: str, timeout_s: float, watch: Callable[[], None] = lambda: None
) -> TaskCompleted:
    """The request's result, read from the results topic on the host's Kafka."""
    log = open_event_log(deployed.settings)
    consumer = log.consumer(f"cluster-test-{uuid.uuid4().hex[:6]}", "mayfly.results")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            watch()
            for record in consumer.poll(100, 1.0):
                event = from_kafka(record.headers, record.key, record.value)
                if isinstance(event, TaskCompleted) and event.request_id == request_id:
                    return event
    finally:
        consumer.close()
        log.close()
    raise AssertionError(f"no result for {request_id} on mayfly.results in {timeout_s:.0f}s")


def test_a_request_on_kafka_scales_its_coordinator_from_zero_and_traces_to_jaeger(
    deployed: Deployed, jaeger: JaegerServer
) -> None:
    api = deployed.api
    # Knative scales the Service to zero once it has been idle (10 s here, see
    # dev/services/cluster.py): the request below must start a pod.
    _wait_for_zero(api, "reboot", timeout_s=120)

    published_at = time.time()
    devices = ["sim-0001", "sim-0002", "sim-0003"]
    request_id, trace_id = _publish(
        deployed, ["reboot", *(w for d in devices for w in ("-d", d))], jaeger
    )
    pods: list[client.V1Pod] = []

    def watch() -> None:
        pods.extend([] if pods else _pods(api, "reboot"))

    found = _result(deployed, request_id, timeout_s=180, watch=watch)
    done_at = time.time()
    assert found.status == "succeeded", found
    assert sorted(d.device_id for d in found.devices) == devices
    # The devices themselves were called, from inside the cluster.
    calls = deployed.simulator.log()
    assert all(calls.get(d) for d in devices), calls

    # The coordinator ran in a pod Knative made for this request.
    assert pods, "no pod of the reboot Service was seen while the request ran"
    started = min(datetime.timestamp(p.metadata.creation_timestamp) for p in pods)
    assert started >= published_at - 1, "the pod existed before the request: not from zero"

    # One trace from the publisher through Knative's delivery to the coordinator's pod
    # (its queue-proxy) and the aggregator's spans of the task and each device.
    want = {
        ("mayfly-publisher", "send mayfly.requests.normal"),
        ("broker.ingress", "POST /mayfly/mayfly-normal"),
        ("inmemorychannel-dispatcher", "POST"),
        ("broker.filter", "trigger:reboot-normal.mayfly"),
        ("activator", "activator_proxy"),
        ("reboot", "kn.queueproxy.proxy"),
        ("mayfly-aggregator", "task reboot"),
    }
    want |= {("mayfly-aggregator", f"device sim-000{n}") for n in (1, 2, 3)}
    spans = _jaeger_spans(jaeger, trace_id, want, timeout_s=90)
    services = sorted({service for service, _ in spans})
    print(
        json.dumps(
            {
                "publish_to_result_s": round(done_at - published_at, 2),
                "publish_to_pod_s": round(started - published_at, 2),
                "trace_services": services,
                "trace_id": trace_id,
            }
        )
    )


def test_a_long_task_runs_as_a_job_of_its_jobsink_reading_the_event_it_mounts(
    deployed: Deployed, jaeger: JaegerServer
) -> None:
    # firmware-update's 600 s timeout is over a revision's limit: `mayfly deploy` made it a
    # JobSink, whose Job runs job mode on the event JobSink mounts (K_EVENT_PATH is that
    # folder, set by JobSink after the container's own variables).
    batch = client.BatchV1Api(deployed.api)
    before = {j.metadata.name for j in batch.list_namespaced_job(NAMESPACE).items if j.metadata}
    request_id, _ = _publish(
        deployed, ["firmware-update", "-d", "sim-0003", "-p", "version=2.0.0"], jaeger
    )
    found = _result(deployed, request_id, timeout_s=240)
    assert found.status == "succeeded", found
    assert [(d.device_id, d.status) for d in found.devices] == [("sim-0003", "succeeded")]
    # One new Job, which ends as succeeded (its exit code: the result was delivered).
    deadline = time.monotonic() + 60
    while True:
        jobs = [j for j in batch.list_namespaced_job(NAMESPACE).items if j.metadata]
        new = [j for j in jobs if j.metadata and j.metadata.name not in before]
        assert len(new) == 1, [j.metadata.name for j in jobs if j.metadata]
        if (new[0].status and new[0].status.succeeded) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert new[0].status is not None
    assert new[0].status.succeeded == 1, new[0].status
