"""Render the Knative resources that run one task type on a cluster.

Pure functions from a package manifest to Kubernetes objects (plain dicts, ready
for YAML or the API): no I/O here. The objects refer by name to the shared
resources of ``knative/base`` (Brokers per lane, the results and dead-letter
KafkaSinks, the ``mayfly-config`` ConfigMap, the ``mayfly-s3`` Secret), so the
base is installed once and each task type adds only its own objects.

A task type becomes one of two shapes, chosen by the package's ``timeout_s``:

- a **Knative Service** (scale to zero, one request per instance) with one
  Trigger per priority lane, when the whole request fits in a revision's
  ``timeoutSeconds`` (Knative stops revisions at 600 s unless the cluster
  raises ``max-revision-timeout-seconds``);
- a **JobSink** (one Kubernetes Job per request) with the same Triggers,
  for longer tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mayfly import __version__
from mayfly.errors import DeployError
from mayfly.events import TASK_REQUESTED, Priority
from mayfly.exitcodes import ExitCode
from mayfly.packages.manifest import Manifest
from mayfly.settings import DEFAULT_SHARD_SIZE

__all__ = [
    "DEFAULT_IMAGE",
    "DeployOptions",
    "Resource",
    "Shape",
    "describe",
    "kn_command",
    "render_task",
    "service_timeout_s",
    "shape_of",
]

Resource = dict[str, Any]
"""One Kubernetes object as the API takes it (``apiVersion``, ``kind``, ``metadata``...)."""

DEFAULT_IMAGE = f"mayfly/functions:{__version__}"
"""The functions image as the Containerfile tags it; overlays rewrite it with kustomize's
``images:`` to the registry it was pushed to."""

STARTUP_MARGIN_S = 30
"""Seconds added to the package's ``timeout_s``: fetching and verifying the package before
the first device, and delivering the result after the last."""
MAX_REVISION_TIMEOUT_S = 600
"""Knative Serving's default ``max-revision-timeout-seconds``."""

# Names of the shared objects in knative/base; tests check the base defines each one.
BROKER_PREFIX = "mayfly"
"""Broker ``mayfly-<lane>`` reads the lane's topic ``mayfly.requests.<lane>``."""
RESULTS_SINK = "mayfly-results"
LANE_SINK_PREFIX = "mayfly-requests-"
"""KafkaSink ``mayfly-requests-<lane>`` writes the lane's topic."""
DEAD_LETTER_SINK = "mayfly-deadletter"
DEFERRED_SINK = "mayfly-deferred"
"""KafkaSink ``mayfly-deferred`` writes the deferred topic the waker function empties."""
CONFIG_MAP = "mayfly-config"
S3_SECRET = "mayfly-s3"  # noqa: S105 - the Secret's name, not a secret
TRUSTED_KEYS_CONFIG_MAP = "mayfly-trusted-keys"
TRUSTED_KEYS_PATH = "/etc/mayfly/trusted-keys"
KAFKA_SINK_INGRESS = "http://kafka-sink-ingress.knative-eventing.svc.cluster.local"
"""Where eventing-kafka-broker's data plane takes events for KafkaSink ``NS/NAME``."""

ROLE_LABEL = "mayfly.dev/role"
TASK_LABEL = "mayfly.dev/task-type"
VERSION_ANNOTATION = "mayfly.dev/package-version"
DELIVERY_ORDER_ANNOTATION = "kafka.eventing.knative.dev/delivery.order"

_KSVC = "serving.knative.dev/v1"
_EVENTING = "eventing.knative.dev/v1"
_KAFKA_EVENTING = "eventing.knative.dev/v1alpha1"
_JOBSINK = "sinks.knative.dev/v1alpha1"

Shape = Literal["service", "job"]


@dataclass(frozen=True)
class DeployOptions:
    """How a task type is deployed; the defaults match ``knative/base``."""

    image: str = DEFAULT_IMAGE
    namespace: str = "mayfly"
    max_scale: int = 10
    """Instances of one task type's coordinator at most (each runs one request)."""
    max_processes: int = 8
    """Task processes per coordinator (``MAYFLY_MAX_PROCESSES``); sizes the memory limit."""
    lanes: Sequence[Priority] = field(default_factory=lambda: tuple(Priority))
    retries: int = 2
    """Redeliveries of a request whose coordinator failed before it could answer."""
    max_revision_timeout_s: int = MAX_REVISION_TIMEOUT_S
    runtime_class: str | None = None
    """``runtimeClassName`` for confidential containers (e.g. ``kata-qemu-snp``)."""
    shape: Shape | None = None
    """Force a Service or a JobSink; None chooses by the package's timeout."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Devices one coordinator instance runs at most (``MAYFLY_SHARD_SIZE``): a
    request over more is published back to its lane as shards, each delivered
    to an instance of its own."""
    store: str | None = None
    """``MAYFLY_STORE`` of the coordinator, over ``mayfly-config``'s: a store
    baked into its image (``mayfly deploy --image-build``)."""

    def __post_init__(self) -> None:
        if self.max_scale < 1:
            raise DeployError(f"max scale must be at least 1, not {self.max_scale}")
        if self.max_processes < 1:
            raise DeployError(f"max processes must be at least 1, not {self.max_processes}")
        if self.shard_size < 1:
            raise DeployError(f"shard size must be at least 1, not {self.shard_size}")
        if not self.lanes:
            raise DeployError("at least one priority lane is needed")


def service_timeout_s(manifest: Manifest) -> int:
    """``timeoutSeconds`` for the task type: the whole request plus start-up and delivery."""
    return math.ceil(manifest.limits.timeout_s) + STARTUP_MARGIN_S


def shape_of(manifest: Manifest, options: DeployOptions) -> Shape:
    """Service when a request fits in a revision's timeout, else JobSink."""
    if options.shape is not None:
        if options.shape == "service" and service_timeout_s(manifest) > (
            options.max_revision_timeout_s
        ):
            raise DeployError(
                f"{manifest.name} {manifest.version}: timeout_s {manifest.limits.timeout_s:g} "
                f"needs timeoutSeconds {service_timeout_s(manifest)}, above the cluster's "
                f"max-revision-timeout-seconds {options.max_revision_timeout_s}; deploy it "
                "as a job, or raise that limit and pass it with --max-revision-timeout"
            )
        return options.shape
    if service_timeout_s(manifest) > options.max_revision_timeout_s:
        return "job"
    return "service"


def describe(resource: Resource) -> str:
    """``Kind namespace/name`` (or ``Kind name`` when cluster-scoped), for messages."""
    meta = resource.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{resource.get('kind', '?')} {where}{meta.get('name', '?')}"


def render_task(manifest: Manifest, options: DeployOptions | None = None) -> list[Resource]:
    """Every object that runs ``manifest``'s task type: its workload, then one Trigger a lane."""
    options = options or DeployOptions()
    shape = shape_of(manifest, options)
    workload = _service(manifest, options) if shape == "service" else _jobsink(manifest, options)
    return [workload, *(_trigger(manifest, options, lane, workload) for lane in options.lanes)]


def kn_command(manifest: Manifest, options: DeployOptions | None = None) -> list[str]:
    """The ``kn service create`` argv writing the same Service, as far as ``kn`` can.

    ``kn`` has no flags for ``envFrom`` keys, volumes' sources, the restricted
    securityContext details or ``runtimeClassName``, so those stay YAML-only; the
    fields it does have (image, env, scale, concurrency, timeout, resources, labels)
    must agree with :func:`render_task`, and a test holds them to it.
    """
    options = options or DeployOptions()
    if shape_of(manifest, options) != "service":
        raise DeployError(f"{manifest.name} runs as a JobSink; kn creates Services only")
    argv = [
        "kn", "service", "create", manifest.name,
        "--namespace", options.namespace,
        "--image", options.image,
        "--scale-min", "0",
        "--scale-max", str(options.max_scale),
        "--concurrency-limit", "1",
        "--timeout", str(service_timeout_s(manifest)),
    ]  # fmt: skip
    for name, value in _plain_env(manifest, options):
        argv += ["--env", f"{name}={value}"]
    requests, limits = _resources(manifest, options)
    argv += ["--request", ",".join(f"{k}={v}" for k, v in requests.items())]
    argv += ["--limit", ",".join(f"{k}={v}" for k, v in limits.items())]
    for key, value in _labels(manifest, "coordinator").items():
        argv += ["--label", f"{key}={value}"]
    return argv


def _labels(manifest: Manifest, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "mayfly",
        "app.kubernetes.io/component": role,
        ROLE_LABEL: role,
        TASK_LABEL: manifest.name,
    }


def _plain_env(manifest: Manifest, options: DeployOptions) -> list[tuple[str, str]]:
    processes = min(manifest.limits.max_parallel, options.max_processes)
    return [
        ("FUNCTION_TARGET", "coordinator"),
        ("TASK_TYPE", manifest.name),
        ("MAYFLY_MAX_PROCESSES", str(processes)),
        ("MAYFLY_SHARD_SIZE", str(options.shard_size)),
        # Shards go back to their lane's KafkaSink (knative/base/kafka.yaml); the
        # coordinator puts each shard's priority in place of {priority}.
        (
            "MAYFLY_SHARD_SINK",
            f"{KAFKA_SINK_INGRESS}/{options.namespace}/{LANE_SINK_PREFIX}{{priority}}",
        ),
        # A request its schedule holds waits there (knative/base/waker.yaml moves it back).
        ("MAYFLY_DEFER_SINK", f"{KAFKA_SINK_INGRESS}/{options.namespace}/{DEFERRED_SINK}"),
        ("OTEL_SERVICE_NAME", f"mayfly-coordinator-{manifest.name}"),
        *([("MAYFLY_STORE", options.store)] if options.store else []),
    ]


def _resources(manifest: Manifest, options: DeployOptions) -> tuple[dict[str, str], dict[str, str]]:
    # The coordinator itself needs ~100 MiB; each task process may grow to the package's
    # memory limit (enforced as an address-space limit inside the container), so the
    # container's limit lets every process reach it rather than OOM-killing the coordinator.
    processes = min(manifest.limits.max_parallel, options.max_processes)
    limit_mib = 256 + processes * manifest.limits.memory_mb
    return {"cpu": "250m", "memory": "192Mi"}, {"memory": f"{limit_mib}Mi"}


def _container(manifest: Manifest, options: DeployOptions, name: str) -> Resource:
    requests, limits = _resources(manifest, options)
    return {
        "name": name,
        "image": options.image,
        "env": [{"name": k, "value": v} for k, v in _plain_env(manifest, options)],
        "envFrom": [
            {"configMapRef": {"name": CONFIG_MAP}},
            {"secretRef": {"name": S3_SECRET}},
        ],
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            # The "restricted" Pod Security Standard.
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "trusted-keys", "mountPath": TRUSTED_KEYS_PATH, "readOnly": True}
        ],
    }


def _pod_spec_extras(options: DeployOptions) -> dict[str, Any]:
    volumes = [{"name": "trusted-keys", "configMap": {"name": TRUSTED_KEYS_CONFIG_MAP}}]
    extras: dict[str, Any] = {"volumes": volumes}
    if options.runtime_class:
        extras["runtimeClassName"] = options.runtime_class
    return extras


def _workload_metadata(manifest: Manifest, options: DeployOptions) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "namespace": options.namespace,
        "labels": _labels(manifest, "coordinator"),
        "annotations": {VERSION_ANNOTATION: manifest.version},
    }


def _service(manifest: Manifest, options: DeployOptions) -> Resource:
    timeout = service_timeout_s(manifest)
    labels = _labels(manifest, "coordinator")
    return {
        "apiVersion": _KSVC,
        "kind": "Service",
        "metadata": _workload_metadata(manifest, options),
        "spec": {
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "autoscaling.knative.dev/min-scale": "0",
                        "autoscaling.knative.dev/max-scale": str(options.max_scale),
                    },
                },
                "spec": {
                    "containerConcurrency": 1,
                    # The coordinator answers only when the request is done, so the
                    # first byte and the last come together: both timeouts are the same.
                    "timeoutSeconds": timeout,
                    "responseStartTimeoutSeconds": timeout,
                    "containers": [_container(manifest, options, "coordinator")],
                    **_pod_spec_extras(options),
                },
            }
        },
    }


def _jobsink(manifest: Manifest, options: DeployOptions) -> Resource:
    timeout = service_timeout_s(manifest)
    container = _container(manifest, options, "coordinator")
    # Job mode (`python -m mayfly.coordinator`) reads the event JobSink mounts in
    # /etc/jobsink-event: JobSink sets K_EVENT_PATH to that folder itself, after the
    # container's own variables (a value set here would be overridden). A SinkBinding
    # cannot reach Jobs that JobSink creates, so the results KafkaSink's address is set here.
    container["command"] = ["python", "-m", "mayfly.coordinator"]
    container["env"] += [
        {
            "name": "MAYFLY_RESULT_SINK",
            "value": f"{KAFKA_SINK_INGRESS}/{options.namespace}/{RESULTS_SINK}",
        },
    ]
    labels = _labels(manifest, "coordinator")
    return {
        "apiVersion": _JOBSINK,
        "kind": "JobSink",
        "metadata": _workload_metadata(manifest, options),
        "spec": {
            "job": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"labels": labels},
                "spec": {
                    "activeDeadlineSeconds": timeout,
                    "ttlSecondsAfterFinished": 3600,
                    "backoffLimit": options.retries,
                    # Job mode's final exit codes (partial, failed, rejected: the result
                    # was delivered; a bad configuration, which a retry cannot fix):
                    # only an undelivered result and crashes retry.
                    "podFailurePolicy": {
                        "rules": [
                            {
                                "action": "FailJob",
                                "onExitCodes": {
                                    "containerName": "coordinator",
                                    "operator": "In",
                                    "values": ExitCode.final_failure_codes(),
                                },
                            }
                        ]
                    },
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [container],
                            **_pod_spec_extras(options),
                        },
                    },
                },
            }
        },
    }


def _trigger(
    manifest: Manifest, options: DeployOptions, lane: Priority, workload: Resource
) -> Resource:
    return {
        "apiVersion": _EVENTING,
        "kind": "Trigger",
        "metadata": {
            "name": f"{manifest.name}-{lane.value}",
            "namespace": options.namespace,
            "labels": _labels(manifest, "coordinator"),
            # Records of one partition key (one device) reach the coordinator in order.
            "annotations": {DELIVERY_ORDER_ANNOTATION: "ordered"},
        },
        "spec": {
            "broker": f"{BROKER_PREFIX}-{lane.value}",
            "filter": {"attributes": {"type": TASK_REQUESTED, "tasktype": manifest.name}},
            "subscriber": {
                "ref": {
                    "apiVersion": workload["apiVersion"],
                    "kind": workload["kind"],
                    "name": manifest.name,
                }
            },
            "delivery": {
                "retry": options.retries,
                "backoffPolicy": "exponential",
                "backoffDelay": "PT2S",
                "deadLetterSink": {
                    "ref": {
                        "apiVersion": _KAFKA_EVENTING,
                        "kind": "KafkaSink",
                        "name": DEAD_LETTER_SINK,
                    }
                },
            },
        },
    }
