"""Fixtures for the real servers that integration tests talk to.

`dev/services` starts the servers and exports where they are; `make test` runs
pytest through it, and `make up` leaves them running for `make unit` or a bare
`pytest` (after `eval "$(.venv/bin/python dev/services env)"`).

When a server's variables are absent, the tests that need it skip: a laptop
without the servers still runs everything else. Under ``CI=true`` they fail
instead, so CI can never pass by silently skipping its integration tests.

Every test also starts in a clean environment (:func:`isolated_environment`):
none of the developer's Mayfly, OpenTelemetry, Knative or job-mode variables,
and a home folder of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from minio import Minio

# Names exported by dev/services (S3_ENDPOINT_ENV and friends there).
S3_ENDPOINT_ENV = "MAYFLY_TEST_S3_ENDPOINT"
S3_ACCESS_KEY_ENV = "MAYFLY_TEST_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "MAYFLY_TEST_S3_SECRET_KEY"
KAFKA_BOOTSTRAP_ENV = "MAYFLY_TEST_KAFKA_BOOTSTRAP"
OTLP_ENDPOINT_ENV = "MAYFLY_TEST_OTLP_ENDPOINT"
JAEGER_URL_ENV = "MAYFLY_TEST_JAEGER_URL"
KUBECONFIG_ENV = "MAYFLY_TEST_KUBECONFIG"
KNATIVE_CRDS_ENV = "MAYFLY_TEST_KNATIVE_CRDS"
KUSTOMIZE_ENV = "MAYFLY_TEST_KUSTOMIZE"
KNATIVE_WEBHOOKS_ENV = "MAYFLY_TEST_KNATIVE_WEBHOOKS"
KN_ENV = "MAYFLY_TEST_KN"
CLUSTER_KUBECONFIG_ENV = "MAYFLY_TEST_CLUSTER_KUBECONFIG"
CLUSTER_NODE_ENV = "MAYFLY_TEST_CLUSTER_NODE"


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server is and the credentials of an identity allowed everything."""

    endpoint: str
    access_key: str
    secret_key: str

    def client(self) -> Minio:
        """A MinIO client for this server (plain HTTP: it only listens on loopback)."""
        return Minio(
            urlsplit(self.endpoint).netloc,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
        )


@dataclass(frozen=True)
class JaegerServer:
    """Where to send spans (OTLP/HTTP) and where to read them back (Jaeger's query API)."""

    otlp_endpoint: str
    """Base URL of the OTLP/HTTP receiver; spans go to ``{otlp_endpoint}/v1/traces``."""
    query_url: str
    """Base URL of the query API, e.g. ``{query_url}/api/traces/{trace_id}``."""


#: Variables a developer's shell (or a CI job) may hold that change what Mayfly does:
#: its settings, OpenTelemetry's, Knative's sink and job mode's request (see
#: mayfly.coordinator.job).
_SCRUBBED_PREFIXES = ("MAYFLY_", "OTEL_", "TASK_")
_SCRUBBED_NAMES = frozenset({"K_SINK", "K_EVENT_PATH", "DEVICE_IDS", "DEVICE_SELECTOR"})
#: Where dev/services keeps its pid files (dev/services/base.py, services_home()).
SERVICES_HOME_ENV = "MAYFLY_SERVICES_HOME"
#: Kept: MAYFLY_TEST_* name the test servers, and dev/services needs its folder to
#: find them (`dev/services pid kafka` in the tests that pause the broker).
_KEPT = ("MAYFLY_TEST_", SERVICES_HOME_ENV)


@pytest.fixture(autouse=True)
def isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every test: none of the variables above, and ``HOME`` a fresh folder of its own.

    ``XDG_DATA_HOME`` points inside it too, so Mayfly's default home
    (``$XDG_DATA_HOME/mayfly``) is never the developer's ``~/.local/share/mayfly``.
    Autouse fixtures run before the other function-scoped ones, so fixtures that
    copy ``os.environ`` for a subprocess copy the clean one. Returns that home.
    """
    for name in list(os.environ):
        if name.startswith(_KEPT):
            continue
        if name.startswith(_SCRUBBED_PREFIXES) or name in _SCRUBBED_NAMES:
            monkeypatch.delenv(name)
    # dev/services' default folder is under ~/.cache: pin it before HOME moves.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    monkeypatch.setenv(
        SERVICES_HOME_ENV, os.environ.get(SERVICES_HOME_ENV) or str(cache / "mayfly" / "services")
    )
    # Not tmp_path itself: tests that list their tmp_path must not find our folders there.
    home = tmp_path_factory.mktemp("user-home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    return home


def _missing_server(what: str) -> None:
    message = f"no {what} server: run `make test` or `make up`"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: integration tests must not skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> None:
    """pip reaches a package index (builds of packages with dependencies
    resolve there); skips without one (fails in CI)."""
    import subprocess
    import sys

    into = tmp_path_factory.mktemp("index-probe")
    probe = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    probe += ["--only-binary=:all:", "--dest", str(into), "humanize==4.17.0"]
    if subprocess.run(probe, capture_output=True, timeout=300, check=False).returncode != 0:
        _missing_server("package index")


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """The S3 server named by the MAYFLY_TEST_S3_* variables; skips (fails in CI) without one."""
    names = (S3_ENDPOINT_ENV, S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)
    values = [os.environ.get(name, "") for name in names]
    if not all(values):
        _missing_server("S3")
    endpoint, access_key, secret_key = values
    return S3Server(endpoint=endpoint, access_key=access_key, secret_key=secret_key)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[tuple[S3Server, str]]:
    """A new, empty, uniquely named bucket, deleted with its objects after the test."""
    client = s3_server.client()
    bucket = f"mayfly-test-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    try:
        yield s3_server, bucket
    finally:
        for obj in client.list_objects(bucket, recursive=True):
            if obj.object_name is not None:
                client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``host:port`` of the Kafka broker (MAYFLY_TEST_KAFKA_BOOTSTRAP); skips (fails in CI)."""
    bootstrap = os.environ.get(KAFKA_BOOTSTRAP_ENV, "")
    if not bootstrap:
        _missing_server("Kafka")
    return bootstrap


@pytest.fixture(scope="session")
def jaeger() -> JaegerServer:
    """The Jaeger server named by MAYFLY_TEST_OTLP_ENDPOINT and MAYFLY_TEST_JAEGER_URL."""
    otlp_endpoint = os.environ.get(OTLP_ENDPOINT_ENV, "")
    query_url = os.environ.get(JAEGER_URL_ENV, "")
    if not (otlp_endpoint and query_url):
        _missing_server("Jaeger")
    return JaegerServer(otlp_endpoint=otlp_endpoint, query_url=query_url)


def _kube_path(name: str, what: str, server: str = "Kubernetes API") -> Path:
    """The path in variable `name` (exported by the `kube` or `knative` service); skips
    (fails in CI)."""
    value = os.environ.get(name, "")
    if not value:
        _missing_server(server)
    path = Path(value)
    if not path.exists():
        pytest.fail(f"{name}={value}: no {what} there", pytrace=False)
    return path


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """Kubeconfig of the real kube-apiserver with the Knative CRDs (MAYFLY_TEST_KUBECONFIG).

    Token auth and a pinned CA; its context's namespace is ``mayfly``, which exists. No
    controllers run: use it for server-side dry runs (``dry_run="All"``, strict field
    validation) or for objects that need nothing to reconcile them.
    """
    return _kube_path(KUBECONFIG_ENV, "kubeconfig")


@pytest.fixture(scope="session")
def knative_crds() -> Path:
    """Folder of the Knative CRDs installed in that server (MAYFLY_TEST_KNATIVE_CRDS).

    One ``<crd name>.yaml`` per CRD, e.g. ``services.serving.knative.dev.yaml``.
    """
    return _kube_path(KNATIVE_CRDS_ENV, "CRD folder")


@pytest.fixture(scope="session")
def knative_webhooks(kubeconfig: Path) -> Path:
    """Knative's admission webhooks (serving, eventing, eventing-kafka-broker) judge every
    Knative object sent to that API server, dry runs included, and convert the CRDs whose
    versions convert through them (the `knative` service). Returns their logs' folder
    (``knative-<serving|eventing|kafka>.log``)."""
    logs = _kube_path(KNATIVE_WEBHOOKS_ENV, "webhook log folder", "Knative webhook")
    # The variable can outlive the service: are the webhooks registered right now?
    from kubernetes import client, config

    registered = client.AdmissionregistrationV1Api(
        config.new_client_from_config(str(kubeconfig))
    ).list_validating_webhook_configuration()
    names = {item.metadata.name for item in registered.items}
    if "validation.webhook.serving.knative.dev" not in names:
        pytest.fail(
            f"{KNATIVE_WEBHOOKS_ENV} is set but no Knative webhook is registered with the API "
            "server: is the knative service up (`python dev/services status`)?",
            pytrace=False,
        )
    return logs


@pytest.fixture(scope="session")
def kn_bin() -> Path:
    """A ``kn`` v0.42.0 binary (MAYFLY_TEST_KN), built with the `knative` service."""
    return _kube_path(KN_ENV, "kn binary", "Knative webhook")


@dataclass(frozen=True)
class KnativeCluster:
    """The one-node Kubernetes with Knative of ``dev/services up cluster``."""

    kubeconfig: Path
    node: str
    """The address at which its pods reach this machine's test servers."""


@pytest.fixture(scope="session")
def knative_cluster() -> KnativeCluster:
    """The `cluster` service (MAYFLY_TEST_CLUSTER_*); skips (fails in CI) without it."""
    kubeconfig = _kube_path(CLUSTER_KUBECONFIG_ENV, "kubeconfig", "Knative cluster")
    return KnativeCluster(kubeconfig=kubeconfig, node=os.environ.get(CLUSTER_NODE_ENV, ""))


@pytest.fixture(scope="session")
def kustomize_bin() -> Path:
    """A ``kustomize`` v5 binary (MAYFLY_TEST_KUSTOMIZE), built with the `kube` service."""
    return _kube_path(KUSTOMIZE_ENV, "kustomize binary")


def processes_of(mayfly_home: Path) -> list[int]:
    """Live processes (not zombies, not this one) whose environment has this
    MAYFLY_HOME: what a runtime started there left running."""
    marker = f"MAYFLY_HOME={mayfly_home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found
