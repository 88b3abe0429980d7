"""The task package manifest: what a package is, what it needs, and its limits.

A package folder holds ``manifest.json`` next to its code. The manifest is
validated here, before a package is built, published, or run, so a mistake is
reported by field rather than discovered on a device.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import semver
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mayfly.errors import ManifestError

__all__ = [
    "MANIFEST_FILE",
    "NAME_PATTERN",
    "Limits",
    "Manifest",
    "load_manifest",
    "parse_manifest",
]

MANIFEST_FILE = "manifest.json"
NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_CAPABILITY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class Limits(BaseModel):
    """Resource and retry limits the coordinator enforces while running a package."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    """Wall time for the whole request."""
    device_timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    """Wall time for one attempt on one device."""
    memory_mb: int = Field(default=256, ge=16, le=65_536)
    max_parallel: int = Field(default=50, ge=1, le=10_000)
    """Devices worked on at the same time."""
    retries: int = Field(default=2, ge=0, le=20)
    """Extra attempts per device after a failed one."""


class Manifest(BaseModel):
    """A validated package manifest. Frozen: a published version never changes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: str
    description: str = ""
    entrypoint: str
    params_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "additionalProperties": False}
    )
    limits: Limits = Field(default_factory=Limits)
    capabilities: tuple[str, ...] = ()
    """Device capabilities a target device must advertise."""
    dependencies: tuple[str, ...] = ()
    """PEP 508 requirements the package code imports beyond the standard library:
    resolved when it is built and carried inside it (:mod:`mayfly.packages.deps`)."""

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not semver.Version.is_valid(value):
            raise ValueError(f"{value!r} is not a semantic version such as 1.2.0")
        return value

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        if not _ENTRYPOINT.match(value):
            raise ValueError(f"{value!r} is not of the form module:function")
        return value

    @field_validator("params_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
        return value

    @field_validator("dependencies")
    @classmethod
    def _dependencies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from mayfly.packages.deps import MAX_DEPENDENCIES, check_requirement

        if len(value) > MAX_DEPENDENCIES:
            raise ValueError(f"{len(value)} requirements; at most {MAX_DEPENDENCIES}")
        return tuple(check_requirement(req) for req in value)

    @field_validator("capabilities")
    @classmethod
    def _capabilities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cap in value:
            if not _CAPABILITY.match(cap):
                raise ValueError(f"{cap!r} is not a valid capability name")
        return value

    @property
    def module(self) -> str:
        return self.entrypoint.partition(":")[0]

    @property
    def function(self) -> str:
        return self.entrypoint.partition(":")[2]

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, so the same manifest hashes the same."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2).encode() + b"\n"


def parse_manifest(raw: bytes | str, *, origin: str = MANIFEST_FILE) -> Manifest:
    """Parse and validate manifest JSON.

    Raises:
        ManifestError: naming the field at fault and ``origin``.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{origin} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{origin} must hold a JSON object")
    name = data.get("name") if isinstance(data.get("name"), str) else None
    version = data.get("version") if isinstance(data.get("version"), str) else None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        msg = first["msg"].removeprefix("Value error, ")
        raise ManifestError(
            f"{origin}: field {field!r}: {msg}", package=name, version=version
        ) from exc


def load_manifest(folder: Path) -> Manifest:
    """Read ``manifest.json`` from a package folder."""
    path = folder / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"no {MANIFEST_FILE} in {folder}") from exc
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_manifest(raw, origin=str(path))
