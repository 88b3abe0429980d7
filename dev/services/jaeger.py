"""The `jaeger` service: Jaeger v2, built with `go` from dev/jaeger/go.mod."""

from __future__ import annotations

import http.client
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from services import gobuild
from services.base import DEV_DIR, HOST, Paths, Service, ServiceError

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
OTLP_ENDPOINT_ENV = "MAYFLY_TEST_OTLP_ENDPOINT"
"""Base URL of Jaeger's OTLP/HTTP receiver, e.g. ``http://127.0.0.1:4318`` (POST /v1/traces)."""
JAEGER_URL_ENV = "MAYFLY_TEST_JAEGER_URL"
"""Base URL of Jaeger's query API, e.g. ``http://127.0.0.1:16686`` (GET /api/traces/ID)."""


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
    module_dir = DEV_DIR / "jaeger"
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
        gobuild.build(
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
