"""The `knative` service: Knative's admission webhooks beside the `kube` API server, and `kn`.

The webhooks of Knative Serving, Eventing and eventing-kafka-broker (the release that
dev/knative/go.mod pins for the CRDs) are built with `go` from dev/knative/webhooks and
dev/knative/kafka (two modules: the Kafka broker's requirements would change the build list
of eventing's own webhook). They run as Knative runs them, each with its namespace's config
ConfigMaps and its webhook configurations, so the API server sends them every Knative
object (dry runs included: they declare no side effects) and they refuse what a schema
cannot: value ranges, defaults, CESQL filters, cross-field rules. The CRDs whose versions
convert through a webhook (`kube` installs them converting by relabelling) are switched
back to webhook conversion while this runs, and back again when it stops.

They listen on every interface, so they run in the network namespace `NETNS`, reached
through loopback relays (services/nsrelay.py): the API server calls them at
``localhost:<port>`` (an ExternalName Service per webhook), and they call the API server at
their namespace's 127.0.0.1:6443. Making a network namespace needs root: without it (or
without `ip` and `nsenter`) `up` passes over this service unless CI=true.

Also built: ``kn`` v0.42.0 (dev/kn), the newest client the module proxy can build (see
dev/kn/go.mod).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from services import gobuild
from services.base import (
    DEV_DIR,
    HOST,
    NAMESPACE_TOOLS,
    Paths,
    Service,
    ServiceError,
    find_tool,
    namespaces_unavailable,
    say,
    services_home,
)
from services.kube import Kube

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
WEBHOOKS_ENV = "MAYFLY_TEST_KNATIVE_WEBHOOKS"
"""Set (to the webhooks' log folder) while Knative's webhooks serve the `kube` API server."""
KN_ENV = "MAYFLY_TEST_KN"
"""Path of a ``kn`` binary."""

NETNS = "mayfly-knative"
APPLIED = "applied.json"
"""In the data folder: the webhook configurations and CRDs a start changed, for undoing."""
FIELD_MANAGER = "mayfly-dev-services"


@dataclass(frozen=True)
class Webhook:
    """One of Knative's webhooks: what it is called, where it runs, how it is built."""

    key: str
    service: str
    namespace: str
    port: int
    profiling: int
    package: str


WEBHOOKS = (
    Webhook(
        "serving", "webhook", "knative-serving", 8443, 18008, "knative.dev/serving/cmd/webhook"
    ),
    Webhook(
        "eventing",
        "eventing-webhook",
        "knative-eventing",
        8444,
        18009,
        "knative.dev/eventing/cmd/webhook",
    ),
    Webhook(
        "kafka",
        "kafka-webhook-eventing",
        "knative-eventing",
        8445,
        18010,
        "knative.dev/eventing-kafka-broker/control-plane/cmd/webhook-kafka",
    ),
)

# Knative's own config objects, by module and path in it (globs): what each webhook reads
# (config-logging, config-observability, config-features, defaults...) and its webhook
# configurations and certificate Secret.
CONFIG_SOURCES: tuple[tuple[str, str], ...] = (
    ("knative.dev/serving", "config/core/configmaps/*.yaml"),
    ("knative.dev/networking", "config/config-network.yaml"),
    ("knative.dev/serving", "config/core/webhooks/*.yaml"),
    ("knative.dev/eventing", "config/core/configmaps/*.yaml"),
    ("knative.dev/eventing", "config/core/webhooks/*.yaml"),
    (
        "knative.dev/eventing-kafka-broker",
        "control-plane/config/eventing-kafka-broker/200-controller/100-config-*.yaml",
    ),
    (
        "knative.dev/eventing-kafka-broker",
        "control-plane/config/eventing-kafka-broker/100-broker/100-kafka-broker-configmap.yaml",
    ),
    (
        "knative.dev/eventing-kafka-broker",
        "control-plane/config/eventing-kafka-broker/100-source/config-kafka-source-defaults.yaml",
    ),
    (
        "knative.dev/eventing-kafka-broker",
        "control-plane/config/eventing-kafka-broker/200-webhook/400-*.yaml",
    ),
)

_KINDS: Mapping[str, tuple[str, str, bool]] = {
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "Namespace": ("/api/v1", "namespaces", False),
    "MutatingWebhookConfiguration": (
        "/apis/admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        False,
    ),
    "ValidatingWebhookConfiguration": (
        "/apis/admissionregistration.k8s.io/v1",
        "validatingwebhookconfigurations",
        False,
    ),
}
"""The kinds applied here: API prefix, resource, namespaced."""

_CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def object_path(obj: Mapping[str, Any]) -> str:
    prefix, resource, namespaced = _KINDS[obj["kind"]]
    meta = obj["metadata"]
    where = f"/namespaces/{meta['namespace']}" if namespaced else ""
    return f"{prefix}{where}/{resource}/{meta['name']}"


class Knative(Service):
    """Knative's three admission webhooks serving the `kube` API server, plus ``kn``."""

    name = "knative"
    port = WEBHOOKS[0].port
    ports: ClassVar[Mapping[str, int]] = {f"{w.key} webhook": w.port for w in WEBHOOKS}
    # Three Go servers making their certificates and caches: ~10 s on an idle 2-core machine.
    start_timeout = 120.0
    module_dir = DEV_DIR / "knative" / "webhooks"
    kafka_module_dir = DEV_DIR / "knative" / "kafka"
    kn_module_dir = DEV_DIR / "kn"
    build_minutes = 6
    kube = Kube()

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    def unavailable(self) -> str | None:
        return namespaces_unavailable(
            "a network namespace for the webhooks", NAMESPACE_TOOLS, ["--net"]
        )

    # -- install -------------------------------------------------------------------------

    def version(self) -> str:
        return Kube._required_version(self.module_dir, "knative.dev/serving")

    def binary(self, paths: Paths, webhook: Webhook) -> Path:
        return paths.cache_dir / f"knative-webhooks-{self.version()}" / webhook.key / "webhook"

    def objects_tool(self, paths: Paths) -> Path:
        return paths.cache_dir / f"knative-webhooks-{self.version()}" / "objects" / "objects"

    def build_objects_tool(self, paths: Paths) -> Path:
        """Build (once) and return mayfly-knative-objects, which prints YAML files as JSON."""
        gobuild.build(
            self,
            paths,
            module_dir=self.module_dir,
            package=".",
            sources=("main.go",),
            binary=self.objects_tool(paths),
            what="the YAML-to-JSON reader of Knative's config objects",
            minutes=1,
        )
        return self.objects_tool(paths)

    def read_objects(self, paths: Paths, files: list[Path]) -> list[dict[str, Any]]:
        """Every object in the YAML ``files``, in order (see `build_objects_tool`)."""
        return self._read_objects(paths, files)

    def kn(self, paths: Paths) -> Path:
        version = Kube._required_version(self.kn_module_dir, "knative.dev/client")
        return paths.cache_dir / f"kn-{version}" / "kn"

    def install(self, paths: Paths) -> None:
        if (problem := self.kube.probe()) is not None:  # before minutes of building
            raise ServiceError(f"knative: needs the kube service up first ({problem})")
        self._check_pins()
        for webhook in WEBHOOKS:
            module = self.kafka_module_dir if webhook.key == "kafka" else self.module_dir
            gobuild.build(
                self,
                paths,
                module_dir=module,
                package=webhook.package,
                binary=self.binary(paths, webhook),
                what=f"Knative's {webhook.key} webhook {self.version()}",
                minutes=self.build_minutes if webhook is WEBHOOKS[0] else 2,
            )
        self.build_objects_tool(paths)
        gobuild.build(
            self,
            paths,
            module_dir=self.kn_module_dir,
            package="knative.dev/client/cmd/kn",
            binary=self.kn(paths),
            what="kn",
            minutes=3,
        )

    def _check_pins(self) -> None:
        # The webhooks must be those of the release whose CRDs `kube` installed.
        pins = self.kube.knative_dir
        for module, module_dir in (
            ("knative.dev/serving", self.module_dir),
            ("knative.dev/eventing", self.module_dir),
            ("knative.dev/eventing-kafka-broker", self.kafka_module_dir),
        ):
            want = Kube._required_version(pins, module)
            have = Kube._required_version(module_dir, module)
            if want != have:
                raise ServiceError(
                    f"knative: {module_dir / 'go.mod'} builds {module} {have}, but "
                    f"{pins / 'go.mod'} pins {want} for the CRDs: make them agree"
                )

    # -- start ---------------------------------------------------------------------------

    def command(self, paths: Paths) -> list[str]:
        # `up` checked `unavailable()`, and `install` that kube is up, just before.
        self._fresh_netns()
        kubeconfig = paths.data_dir / "kubeconfig"
        shutil.copyfile(self.kube.kubeconfig(), kubeconfig)
        kubeconfig.chmod(0o600)
        objects = self._config_objects(paths)
        crds = self._webhook_crds(paths)
        # What `after_stop` undoes, written before any of it is done.
        (paths.data_dir / APPLIED).write_text(
            json.dumps(
                {
                    "webhook configurations": [
                        object_path(o) for o in objects if o["kind"].endswith("Configuration")
                    ],
                    "crds": [crd["metadata"]["name"] for crd in crds],
                }
            )
        )
        try:
            self._apply(objects)
            self._set_conversion(crds, webhook=True)
        except BaseException:
            self.after_stop(paths)
            raise
        logs = paths.log_file.parent
        children = []
        for webhook in WEBHOOKS:
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": str(paths.data_dir),
                "SYSTEM_NAMESPACE": webhook.namespace,
                "WEBHOOK_NAME": webhook.service,
                "WEBHOOK_PORT": str(webhook.port),
                "PROFILING_PORT": str(webhook.profiling),
                "POD_NAME": f"{webhook.service}-mayfly-dev",
                "CONFIG_LOGGING_NAME": "config-logging",
                "CONFIG_OBSERVABILITY_NAME": "config-observability",
                "METRICS_DOMAIN": f"knative.dev/{webhook.key}",
            }
            if webhook.key == "kafka":
                env["CONFIG_LEADERELECTION_NAME"] = "config-kafka-leader-election"
            children.append(
                {
                    "name": webhook.key,
                    # No leader election: one replica each, and the Kafka webhook's two
                    # defaulting controllers share one lease name, so with it the second
                    # (KafkaSource, KafkaSink...) never leads and never gets its rules.
                    "argv": [
                        str(self.binary(paths, webhook)),
                        f"--kubeconfig={kubeconfig}",
                        "--disable-ha",
                    ],
                    "env": env,
                    "log": str(logs / f"knative-{webhook.key}.log"),
                }
            )
        spec = {
            "netns": NETNS,
            "into": [w.port for w in WEBHOOKS],
            "out": [self.kube.port],
            "pids": str(paths.data_dir / "children.json"),
            "children": children,
        }
        spec_file = paths.data_dir / "nsrelay.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        return [sys.executable, "-m", "services.nsrelay", str(spec_file)]

    def server_env(self, paths: Paths) -> dict[str, str]:
        env = super().server_env(paths)
        env["PYTHONPATH"] = str(DEV_DIR)
        return env

    def _fresh_netns(self) -> None:
        ip = find_tool("ip", "iproute2")
        _delete_netns()  # one a killed run left, with what still runs in it
        for argv in ([ip, "netns", "add", NETNS], [ip, "-n", NETNS, "link", "set", "lo", "up"]):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ServiceError(f"knative: `{' '.join(argv)}` failed: {done.stderr.strip()}")

    @functools.cache  # noqa: B019 - one instance per process (the registry's); dirs never move
    def _module_dirs(self) -> dict[str, Path]:
        found = gobuild.module_dirs(
            self,
            self.module_dir,
            ["knative.dev/serving", "knative.dev/eventing", "knative.dev/networking"],
        )
        found.update(
            gobuild.module_dirs(self, self.kafka_module_dir, ["knative.dev/eventing-kafka-broker"])
        )
        return found

    def _read_objects(self, paths: Paths, files: list[Path]) -> list[dict[str, Any]]:
        done = subprocess.run(
            [str(self.objects_tool(paths)), *map(str, files)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ServiceError(f"knative: reading Knative's config objects: {done.stderr.strip()}")
        objects: list[dict[str, Any]] = json.loads(done.stdout)
        return objects

    def _config_objects(self, paths: Paths) -> list[dict[str, Any]]:
        modules = self._module_dirs()
        files: list[Path] = []
        for module, pattern in CONFIG_SOURCES:
            matched = sorted(modules[module].glob(pattern))
            if not matched:
                raise ServiceError(
                    f"knative: no {pattern} in {modules[module]}: did a Knative release move it?"
                )
            files += matched
        by_service = {w.service: w for w in WEBHOOKS}
        namespaces = sorted({w.namespace for w in WEBHOOKS})
        objects: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            for name in namespaces
        ]
        for obj in self._read_objects(paths, files):
            for hook in obj.get("webhooks") or []:
                service = hook["clientConfig"]["service"]
                service["port"] = by_service[service["name"]].port
            objects.append(obj)
        objects += [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": w.service, "namespace": w.namespace},
                "spec": {"type": "ExternalName", "externalName": "localhost"},
            }
            for w in WEBHOOKS
        ]
        unknown = sorted({o["kind"] for o in objects} - _KINDS.keys())
        if unknown:
            raise ServiceError(f"knative: Knative's config has kinds this cannot apply: {unknown}")
        return objects

    def _apply(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            path = f"{object_path(obj)}?fieldManager={FIELD_MANAGER}&force=true"
            status, body = self.kube.api(
                "PATCH", path, obj, content_type="application/apply-patch+yaml"
            )
            if status not in (200, 201):
                raise ServiceError(
                    f"knative: applying {obj['kind']} {obj['metadata']['name']} answered "
                    f"HTTP {status}: {body[:500]!r}"
                )

    def _webhook_crds(self, paths: Paths) -> list[dict[str, Any]]:
        """The Knative CRDs that convert through a webhook, as Knative ships them."""
        modules = self._module_dirs()
        files = [
            path
            for module, folder in Kube.crd_sources.items()
            for path in sorted((modules[module] / folder).rglob("*.yaml"))
            if re.search(r"^\s*strategy:\s*Webhook\s*$", path.read_text(), re.MULTILINE)
        ]
        return [
            crd
            for crd in self._read_objects(paths, files)
            if crd.get("kind") == "CustomResourceDefinition"
            and (crd["spec"].get("conversion") or {}).get("strategy") == "Webhook"
        ]

    def _set_conversion(self, crds: list[dict[str, Any]], *, webhook: bool) -> None:
        """Knative's own conversion for ``crds`` (as read by `_webhook_crds`), or, with
        ``webhook`` False, relabelling (``crds`` then need only their names)."""
        by_service = {w.service: w for w in WEBHOOKS}
        for crd in crds:
            if webhook:
                conversion = crd["spec"]["conversion"]
                service = conversion["webhook"]["clientConfig"]["service"]
                service["port"] = by_service[service["name"]].port
            else:
                conversion = {"strategy": "None", "webhook": None}
            name = crd["metadata"]["name"]
            status, body = self.kube.api(
                "PATCH",
                f"{_CRDS}/{name}",
                {"spec": {"conversion": conversion}},
                content_type="application/merge-patch+json",
            )
            if status != 200:
                raise ServiceError(
                    f"knative: setting {name}'s conversion answered HTTP {status}: {body[:500]!r}"
                )

    # -- probe, exports, stop --------------------------------------------------------------

    def probe(self) -> str | None:
        # Each webhook refuses an object only it can judge, and every webhook-converted CRD
        # carries the CA bundle of the webhook that converts it.
        checks = (
            ("serving", _SERVICE_TOO_LONG, "timeoutSeconds"),
            ("eventing", _TRIGGER_BAD_FILTER, "filter"),
            ("kafka", _SINK_NO_SERVERS, "bootstrapServers"),
        )
        try:
            for key, (path, obj), word in checks:
                status, body = self.kube.api("POST", f"{path}?dryRun=All", obj)
                text = body.decode(errors="replace")
                if status < 400 or "admission webhook" not in text or word not in text:
                    return f"the {key} webhook let a bad object pass: HTTP {status} {text[:200]}"
            # Defaulting too: Knative fills a KafkaSource's initialOffset.
            path, obj = _SOURCE_NO_OFFSET
            status, body = self.kube.api("POST", f"{path}?dryRun=All", obj)
            offset = json.loads(body).get("spec", {}).get("initialOffset")
            if status != 201 or offset != "latest":
                return f"the kafka webhook did not default a KafkaSource: HTTP {status} {offset!r}"
            status, body = self.kube.api("GET", _CRDS)
            waiting = [
                crd["metadata"]["name"]
                for crd in json.loads(body)["items"]
                if (crd["spec"].get("conversion") or {}).get("strategy") == "Webhook"
                and not crd["spec"]["conversion"]["webhook"]["clientConfig"].get("caBundle")
            ]
        except OSError as exc:
            return f"no answer from the API server: {exc}"
        except (ValueError, KeyError, TypeError) as exc:  # an answer of another shape
            return f"an unexpected answer from the API server: {exc!r}"
        if waiting:
            return f"{len(waiting)} CRDs wait for their conversion webhook's CA, e.g. {waiting[0]}"
        return None

    def exports(self) -> dict[str, str]:
        paths = Paths.for_service(services_home(), self.name)
        return {WEBHOOKS_ENV: str(paths.log_file.parent), KN_ENV: str(self.kn(paths))}

    def after_stop(self, paths: Paths) -> None:
        # Also after the relay died on its own (`Manager.stop` calls this then too). The API
        # server may still run: leave it as `kube` alone has it, without webhooks that
        # would refuse every Knative object once nothing answers for them.
        _delete_netns()
        try:
            applied = json.loads((paths.data_dir / APPLIED).read_text())
        except (OSError, ValueError):
            return  # nothing was applied
        if self.kube.probe() is not None:
            return  # stopped too: the next `up` starts it afresh
        undo: list[tuple[str, Callable[[], object]]] = [
            (f"DELETE {path}", functools.partial(self._delete, path))
            for path in applied["webhook configurations"]
        ]
        undo += [
            (
                f"conversion of {name}",
                functools.partial(
                    self._set_conversion, [{"metadata": {"name": name}}], webhook=False
                ),
            )
            for name in applied["crds"]
        ]
        for what, step in undo:  # each on its own: one failure must not skip the rest
            try:
                step()
            except Exception as exc:  # reported; the rest is still undone
                say(f"knative: could not undo {what}: {exc}")
        (paths.data_dir / APPLIED).unlink(missing_ok=True)

    def _delete(self, path: str) -> None:
        status, body = self.kube.api("DELETE", path)
        if status not in (200, 202, 404):
            raise ServiceError(f"HTTP {status}: {body[:200]!r}")


def _delete_netns() -> None:
    """Kill what runs in `NETNS` (only this service starts processes there), then delete it."""
    ip = shutil.which("ip")
    if ip is None:
        return
    listed = subprocess.run(
        [ip, "netns", "pids", NETNS], capture_output=True, text=True, check=False
    )
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run([ip, "netns", "delete", NETNS], capture_output=True, check=False)


_SERVICE_TOO_LONG = (
    "/apis/serving.knative.dev/v1/namespaces/mayfly/services",
    {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "mayfly-probe"},
        "spec": {
            "template": {
                "spec": {"timeoutSeconds": 86400, "containers": [{"image": "mayfly/probe"}]}
            }
        },
    },
)
_TRIGGER_BAD_FILTER = (
    "/apis/eventing.knative.dev/v1/namespaces/mayfly/triggers",
    {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": "mayfly-probe"},
        "spec": {
            "broker": "default",
            "filters": [{"cesql": "type = = 'x'"}],
            "subscriber": {"uri": "http://localhost"},
        },
    },
)
_SINK_NO_SERVERS = (
    "/apis/eventing.knative.dev/v1alpha1/namespaces/mayfly/kafkasinks",
    {
        "apiVersion": "eventing.knative.dev/v1alpha1",
        "kind": "KafkaSink",
        "metadata": {"name": "mayfly-probe"},
        "spec": {"topic": "t", "bootstrapServers": []},
    },
)
_SOURCE_NO_OFFSET = (
    "/apis/sources.knative.dev/v1/namespaces/mayfly/kafkasources",
    {
        "apiVersion": "sources.knative.dev/v1",
        "kind": "KafkaSource",
        "metadata": {"name": "mayfly-probe"},
        "spec": {
            "bootstrapServers": ["127.0.0.1:9092"],
            "topics": ["t"],
            "sink": {"uri": "http://localhost"},
        },
    },
)
