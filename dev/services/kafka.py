"""The `kafka` service: Apache Kafka's jars from Maven Central (via `mvn`), run with `java`."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import socket
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from services import kafkawire
from services.base import (
    DEV_DIR,
    HOST,
    NODE_IP,
    Paths,
    Service,
    ServiceError,
    find_tool,
    install_step,
    log_tail,
    run_logged,
    say,
)

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
KAFKA_BOOTSTRAP_ENV = "MAYFLY_TEST_KAFKA_BOOTSTRAP"
"""``host:port`` of the Kafka broker, e.g. ``127.0.0.1:9092``."""

_LOG4J2 = """\
# Kafka's log to standard output, which dev/services sends to logs/kafka.log.
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


class Kafka(Service):
    """Apache Kafka 4.x in KRaft mode: one JVM that is both broker and controller."""

    name = "kafka"
    port = 9092
    # "cluster": a second listener for the `cluster` service's pods, which reach it at the
    # node's address through a relay (services/cluster.py), so metadata must name that.
    ports: ClassVar[Mapping[str, int]] = {"broker": 9092, "controller": 9093, "cluster": 19092}
    # Formatting plus a JVM start: ~6 s on an idle 2-core machine, several times that when
    # a build or the test suite competes for the cores.
    start_timeout = 120.0
    keeps_data = True
    pom = DEV_DIR / "kafka" / "pom.xml"
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
        mvn = find_tool("mvn", "Maven 3 (e.g. `apt-get install maven`)")
        find_tool("java", "Java 17 or later (e.g. `apt-get install openjdk-17-jre-headless`)")
        say(
            f"kafka: fetching Kafka {self.version} jars with Maven into {libs} "
            "(first run only, under a minute)..."
        )
        partial = libs.with_name("libs.partial")
        shutil.rmtree(partial, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        # Maven's own repository (~/.m2 unless configured) stays the download cache.
        install_step(
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
        # A `restart` keeps it: the broker comes back with its topics, records and offsets.
        data = paths.data_dir
        config = data / "server.properties"
        config.write_text(self._server_properties(data / "kraft"))
        logging_config = data / "log4j2.properties"
        logging_config.write_text(_LOG4J2)
        java = [
            find_tool("java", "Java 17 or later"),
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
        if (data / "kraft" / "meta.properties").exists():
            return [*java, "kafka.Kafka", str(config)]  # formatted before: its own data
        # `format --standalone` makes this node the single KRaft voter of a new cluster.
        formatted = run_logged(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--cluster-id",
                _cluster_id(),
                "--config",
                str(config),
            ],
            log_file=paths.log_file,
            cwd=data,
            env=self.server_env(paths),
            timeout=self.start_timeout,
        )
        if formatted != 0:
            tail = log_tail(paths.log_file)
            raise ServiceError(f"kafka: formatting the storage failed (exit {formatted}){tail}")
        return [*java, "kafka.Kafka", str(config)]

    def _server_properties(self, log_dir: Path) -> str:
        p = self.ports
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{HOST}:{p['controller']}",
            "listeners": (
                f"PLAINTEXT://{HOST}:{p['broker']},CONTROLLER://{HOST}:{p['controller']},"
                f"CLUSTER://{HOST}:{p['cluster']}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://{HOST}:{p['broker']},CLUSTER://{NODE_IP}:{p['cluster']}"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,CLUSTER:PLAINTEXT"
            ),
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
                versions = kafkawire.api_versions(sock)
                missing = {0: "Produce", 1: "Fetch", 3: "Metadata"}.keys() - versions.keys()
                if missing:
                    return f"ApiVersions lists no API key {sorted(missing)}"
                brokers = kafkawire.metadata_brokers(sock)
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


def _cluster_id() -> str:
    """A random cluster id as Kafka writes one: a UUID in unpadded URL-safe base64."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka never makes these: they look like a CLI flag
            return text
