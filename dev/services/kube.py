"""The `kube` service: a Kubernetes API server with the Knative CRDs, plus `kustomize`."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from services import gobuild
from services.base import (
    DEV_DIR,
    HOST,
    Paths,
    Service,
    ServiceError,
    install_step,
    log_tail,
    run_logged,
    say,
    services_home,
)

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
KUBECONFIG_ENV = "MAYFLY_TEST_KUBECONFIG"
"""Path of a kubeconfig for the Kubernetes API server (token auth, CA pinned; namespace
``mayfly``)."""
KNATIVE_CRDS_ENV = "MAYFLY_TEST_KNATIVE_CRDS"
"""Folder of the Knative CRDs installed in that server: one ``<crd name>.yaml`` each."""
KUSTOMIZE_ENV = "MAYFLY_TEST_KUSTOMIZE"
"""Path of a ``kustomize`` (v5) binary."""


class Kube(Service):
    """A Kubernetes API server with the Knative CRDs installed, plus a ``kustomize`` binary.

    One process, ``mayfly-kube serve`` (dev/kube/main.go): kube-apiserver with an embedded
    etcd, both built from the Go modules that dev/kube/go.mod pins, so stopping it stops
    etcd too. No controllers, scheduler or nodes: it stores and validates objects, which is
    what checking the knative/ manifests needs (server-side dry runs with strict field
    validation check them against the real CRD schemas). Knative's admission webhooks do
    not run, so their extra checks (value ranges, defaults) do not apply.

    The CRDs are every CustomResourceDefinition in the config folders of the Knative
    modules that dev/knative/go.mod pins, copied out of the Go module cache at install time.
    Clients authenticate with a bearer token and pin a CA made fresh on each start; both are
    in the kubeconfig this writes. Authorization is AlwaysAllow; anonymous requests are
    refused.
    """

    name = "kube"
    port = 6443
    ports: ClassVar[Mapping[str, int]] = {"apiserver": 6443, "etcd client": 2379, "etcd peer": 2380}
    # API server start plus ~30 CRDs: ~15 s on an idle 2-core machine.
    start_timeout = 180.0
    module_dir = DEV_DIR / "kube"
    knative_dir = DEV_DIR / "knative"
    kustomize_dir = DEV_DIR / "kustomize"
    build_minutes = 12
    token = "mayfly-kube-test-token"  # noqa: S105 - a throwaway credential for a loopback server
    namespace = "mayfly"
    """Created with the CRDs, for the tests' objects (``default`` exists too)."""
    crd_sources: ClassVar[Mapping[str, str]] = {
        "knative.dev/serving": "config",
        "knative.dev/eventing": "config",
        "knative.dev/eventing-kafka-broker": "control-plane/config",
    }
    """Module and the folder in it searched for CRDs."""
    required_crds: ClassVar[frozenset[str]] = frozenset(
        {
            "services.serving.knative.dev",
            "configurations.serving.knative.dev",
            "revisions.serving.knative.dev",
            "routes.serving.knative.dev",
            "domainmappings.serving.knative.dev",
            "brokers.eventing.knative.dev",
            "triggers.eventing.knative.dev",
            "eventtypes.eventing.knative.dev",
            "subscriptions.messaging.knative.dev",
            "channels.messaging.knative.dev",
            "sinkbindings.sources.knative.dev",
            "pingsources.sources.knative.dev",
            "apiserversources.sources.knative.dev",
            "containersources.sources.knative.dev",
            "jobsinks.sinks.knative.dev",
            "kafkasources.sources.knative.dev",
            "kafkasinks.eventing.knative.dev",
            "kafkachannels.messaging.knative.dev",
        }
    )
    """Names the CRD folder must hold: a guard against a Knative release moving its files."""

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    @staticmethod
    def _required_version(module_dir: Path, module: str) -> str:
        gomod = module_dir / "go.mod"
        match = re.search(
            rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", gomod.read_text(), re.MULTILINE
        )
        if match is None:
            raise ServiceError(f"kube: {gomod} requires no {module} version")
        return match.group(1)

    @property
    def version(self) -> str:
        return self._required_version(self.module_dir, "k8s.io/kubernetes")

    def binary(self, paths: Paths) -> Path:
        return paths.cache_dir / f"kube-{self.version}" / "mayfly-kube"

    def kustomize(self, paths: Paths) -> Path:
        version = self._required_version(self.kustomize_dir, "sigs.k8s.io/kustomize/kustomize/v5")
        return paths.cache_dir / f"kustomize-{version}" / "kustomize"

    def crds_dir(self, paths: Paths) -> Path:
        """One ``<crd name>.yaml`` per CRD; ``crds.json`` beside it holds them all."""
        version = self._required_version(self.knative_dir, "knative.dev/serving")
        return paths.cache_dir / f"knative-crds-{version}" / "crds"

    def install(self, paths: Paths) -> None:
        version = self.version
        gobuild.build(
            self,
            paths,
            module_dir=self.module_dir,
            package=".",
            sources=("main.go",),
            binary=self.binary(paths),
            what=f"kube-apiserver {version} and etcd",
            minutes=self.build_minutes,
            ldflags=version_ldflags(version),
        )
        gobuild.build(
            self,
            paths,
            module_dir=self.kustomize_dir,
            package="sigs.k8s.io/kustomize/kustomize/v5",
            binary=self.kustomize(paths),
            what="kustomize",
            minutes=2,
        )
        self._install_crds(paths)

    def _install_crds(self, paths: Paths) -> None:
        crds = self.crds_dir(paths)
        stamp = crds.with_name("complete.stamp")
        digest = hashlib.sha256(
            b"".join((self.knative_dir / f).read_bytes() for f in ("go.mod", "go.sum"))
            + self.binary(paths).with_name("complete.stamp").read_bytes()
        ).hexdigest()
        if crds.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
            return
        say(f"kube: copying the Knative CRDs out of the Go module cache into {crds}...")
        stamp.unlink(missing_ok=True)
        modules = gobuild.module_dirs(self, self.knative_dir, list(self.crd_sources))
        partial = crds.with_name("crds.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial_json = crds.with_name("crds.json.partial")
        sources = [str(modules[module] / folder) for module, folder in self.crd_sources.items()]
        install_step(
            self,
            paths,
            [str(self.binary(paths)), "crds", str(partial), str(partial_json), *sources],
            cwd=crds.parent,
        )
        missing = self.required_crds - {path.stem for path in partial.glob("*.yaml")}
        if missing:
            raise ServiceError(
                f"kube: no CRD {', '.join(sorted(missing))} in {', '.join(sources)}: "
                f"did a Knative release in {self.knative_dir / 'go.mod'} move its files?"
            )
        shutil.rmtree(crds, ignore_errors=True)
        partial.rename(crds)
        partial_json.replace(crds.with_name("crds.json"))
        stamp.write_text(digest + "\n")

    def _paths(self) -> Paths:
        return Paths.for_service(services_home(), self.name)

    def _kubeconfig(self, paths: Paths) -> Path:
        return paths.data_dir / "kubeconfig"

    def command(self, paths: Paths) -> list[str]:
        data = paths.data_dir
        certs = data / "certs"
        binary = str(self.binary(paths))
        made = run_logged([binary, "certs", str(certs)], log_file=paths.log_file, cwd=data)
        if made != 0:
            raise ServiceError(f"kube: making certificates failed{log_tail(paths.log_file)}")
        tokens = data / "tokens.csv"  # token,user,uid,"groups"
        tokens.write_text(f'{self.token},mayfly-test,mayfly-test,"system:masters"\n')
        tokens.chmod(0o600)
        kubeconfig = self._kubeconfig(paths)
        kubeconfig.write_text(json.dumps(self._kubeconfig_document(certs / "ca.crt"), indent=2))
        kubeconfig.chmod(0o600)
        p = self.ports
        return [
            binary,
            "serve",
            f"-etcd-dir={data / 'etcd'}",
            f"-etcd-client-port={p['etcd client']}",
            f"-etcd-peer-port={p['etcd peer']}",
            f"-kubeconfig={kubeconfig}",
            f"-crds={self.crds_dir(paths).with_name('crds.json')}",
            f"-namespace={self.namespace}",
            "--",
            f"--etcd-servers=http://{HOST}:{p['etcd client']}",
            f"--bind-address={HOST}",
            f"--advertise-address={HOST}",
            f"--secure-port={p['apiserver']}",
            f"--cert-dir={certs}",
            f"--tls-cert-file={certs / 'serving.crt'}",
            f"--tls-private-key-file={certs / 'serving.key'}",
            f"--token-auth-file={tokens}",
            "--anonymous-auth=false",
            "--authorization-mode=AlwaysAllow",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs / 'sa.key'}",
            f"--service-account-signing-key-file={certs / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            # No kubelet or controller-manager: nothing would create the default service
            # accounts that ServiceAccount admission wants for pods, and the `kubernetes`
            # Service's endpoints would point at a loopback address.
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _kubeconfig_document(self, ca: Path) -> dict[str, object]:
        # JSON is YAML: kubectl, client-go and the Python client all read it.
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "mayfly-test",
                    "cluster": {"server": self.endpoint, "certificate-authority": str(ca)},
                }
            ],
            "users": [{"name": "mayfly-test", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "mayfly-test",
                    "context": {
                        "cluster": "mayfly-test",
                        "user": "mayfly-test",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "mayfly-test",
        }

    def exports(self) -> dict[str, str]:
        paths = self._paths()
        return {
            KUBECONFIG_ENV: str(self._kubeconfig(paths)),
            KNATIVE_CRDS_ENV: str(self.crds_dir(paths)),
            KUSTOMIZE_ENV: str(self.kustomize(paths)),
        }

    def probe(self) -> str | None:
        # Ready, refusing anonymous requests, and serving every CRD (Established): only
        # then can a test's dry run of a Knative object be validated.
        paths = self._paths()
        ca = paths.data_dir / "certs" / "ca.crt"
        try:
            status, body = _https_request(HOST, self.port, "/readyz", ca=ca, token=self.token)
            if status != 200:
                return f"GET /readyz answered HTTP {status}: {body[:200]!r}"
            status, _ = _https_request(HOST, self.port, "/readyz", ca=ca, token=None)
            if status != 401:
                return f"anonymous GET /readyz answered HTTP {status}, not 401: auth is off"
            status, body = _https_request(
                HOST,
                self.port,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                ca=ca,
                token=self.token,
            )
        except (OSError, ssl.SSLError) as exc:
            return f"no answer on {self.endpoint}: {exc}"
        if status != 200:
            return f"listing CRDs answered HTTP {status}: {body[:200]!r}"
        established = {
            crd["metadata"]["name"]
            for crd in json.loads(body)["items"]
            for condition in (crd.get("status") or {}).get("conditions") or []
            if condition["type"] == "Established" and condition["status"] == "True"
        }
        expected = {path.stem for path in self.crds_dir(paths).glob("*.yaml")} or self.required_crds
        if waiting := expected - established:
            return f"{len(waiting)} CRDs not established yet, e.g. {min(waiting)}"
        return None

    def api(
        self, method: str, path: str, body: object = None, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """One request to the running API server as the test user (see `_https_request`)."""
        ca = self._paths().data_dir / "certs" / "ca.crt"
        return _https_request(
            HOST,
            self.port,
            path,
            ca=ca,
            token=self.token,
            timeout=10.0,
            method=method,
            body=body,
            content_type=content_type,
        )

    def kubeconfig(self) -> Path:
        """The running API server's kubeconfig (see `KUBECONFIG_ENV`)."""
        return self._kubeconfig(self._paths())

    def server_env(self, paths: Paths) -> dict[str, str]:
        # client-go reads KUBECONFIG (we pass -kubeconfig), etcd ETCD_* and the Go runtime
        # GODEBUG; only our command line applies.
        env = super().server_env(paths)
        dropped = ("KUBECONFIG", "GODEBUG")
        return {k: v for k, v in env.items() if k not in dropped and not k.startswith("ETCD_")}


def version_ldflags(version: str) -> list[str]:
    """Go linker flags that stamp a Kubernetes build as Kubernetes' own build does: /version
    and the compatibility version come from them (otherwise v0.0.0-master, which Knative's
    version check refuses)."""
    return [
        word
        for key, value in (
            ("gitVersion", version),
            ("gitMajor", version.lstrip("v").split(".")[0]),
            ("gitMinor", version.split(".")[1]),
            ("gitTreeState", "clean"),
        )
        for word in ("-X", f"k8s.io/component-base/version.{key}={value}")
    ]


def _https_request(
    host: str,
    port: int,
    path: str,
    *,
    ca: Path,
    token: str | None,
    timeout: float = 2.0,
    method: str = "GET",
    body: object = None,
    content_type: str = "application/json",
) -> tuple[int, bytes]:
    """``method`` path over TLS verified against ca, with a bearer token unless token is None;
    ``body``, if given, is sent as JSON (which is YAML too, for server-side apply)."""
    if not ca.is_file():
        raise FileNotFoundError(f"no CA certificate at {ca} yet")
    context = ssl.create_default_context(cafile=str(ca))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["content-type"] = content_type
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
