"""Settings, read once at the edge from the environment (and CLI flags).

Environment variables (CLI flags of the same meaning win over them):

=========================  ===================================================
``MAYFLY_HOME``            Mayfly's own folder: keys, local store, caches.
                           Default ``$XDG_DATA_HOME/mayfly`` or
                           ``~/.local/share/mayfly``.
``MAYFLY_STORE``           Package store: a folder path, or ``s3://BUCKET``.
                           Default ``$MAYFLY_HOME/packages``.
``MAYFLY_S3_ENDPOINT``     S3 endpoint URL, e.g. ``http://127.0.0.1:8333``.
``MAYFLY_S3_ACCESS_KEY``   S3 access key.
``MAYFLY_S3_SECRET_KEY``   S3 secret key.
``MAYFLY_S3_REGION``       S3 region (optional).
``MAYFLY_SIGNING_KEY``     Private key used to sign packages.
                           Default ``$MAYFLY_HOME/keys/signing.key``.
``MAYFLY_TRUSTED_KEYS``    Public keys (files or folders of ``*.pub``),
                           separated by ``:``. Default ``$MAYFLY_HOME/trusted``.
``MAYFLY_INVENTORY``       Device inventory: a file, or ``s3://BUCKET/KEY``.
                           Default ``inventory.json`` in the working folder.
``MAYFLY_RESULT_SINK``     Where results go: ``-`` (stdout), a file,
                           ``http(s)://...`` or ``kafka://HOST:PORT/TOPIC``.
                           ``K_SINK`` (Knative SinkBinding) is used when unset.
``MAYFLY_MAX_PROCESSES``   Cap on task processes per coordinator. Default 16.
``MAYFLY_EVENT_LOG``       The event log: a SQLite file (the embedded default,
                           ``$MAYFLY_HOME/events.db``) or ``kafka://HOST:PORT``.
``MAYFLY_MAX_COORDINATORS`` Coordinator processes running at once. Default 8.
``MAYFLY_PER_TASK_CAP``    Of those, at most this many of one task type. Default 4.
``MAYFLY_TOPIC_PREFIX``    Prefix of every topic name. Default ``mayfly``.
=========================  ===================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mayfly.errors import ConfigError
from mayfly.runtime.eventlog import Topics

__all__ = [
    "DEFAULT_MAX_PROCESSES",
    "ENV_EVENT_LOG",
    "ENV_HOME",
    "ENV_INVENTORY",
    "ENV_K_SINK",
    "ENV_MAX_COORDINATORS",
    "ENV_MAX_PROCESSES",
    "ENV_PER_TASK_CAP",
    "ENV_RESULT_SINK",
    "ENV_S3_ACCESS_KEY",
    "ENV_S3_ENDPOINT",
    "ENV_S3_REGION",
    "ENV_S3_SECRET_KEY",
    "ENV_SIGNING_KEY",
    "ENV_STORE",
    "ENV_TOPIC_PREFIX",
    "ENV_TRUSTED_KEYS",
    "Settings",
]

ENV_HOME = "MAYFLY_HOME"
ENV_STORE = "MAYFLY_STORE"
ENV_S3_ENDPOINT = "MAYFLY_S3_ENDPOINT"
ENV_S3_ACCESS_KEY = "MAYFLY_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "MAYFLY_S3_SECRET_KEY"  # noqa: S105 - a variable name, not a secret
ENV_S3_REGION = "MAYFLY_S3_REGION"
ENV_SIGNING_KEY = "MAYFLY_SIGNING_KEY"
ENV_TRUSTED_KEYS = "MAYFLY_TRUSTED_KEYS"
ENV_INVENTORY = "MAYFLY_INVENTORY"
ENV_RESULT_SINK = "MAYFLY_RESULT_SINK"
ENV_K_SINK = "K_SINK"
ENV_MAX_PROCESSES = "MAYFLY_MAX_PROCESSES"
ENV_EVENT_LOG = "MAYFLY_EVENT_LOG"
ENV_MAX_COORDINATORS = "MAYFLY_MAX_COORDINATORS"
ENV_PER_TASK_CAP = "MAYFLY_PER_TASK_CAP"
ENV_TOPIC_PREFIX = "MAYFLY_TOPIC_PREFIX"

#: Task processes per coordinator unless MAYFLY_MAX_PROCESSES says otherwise.
#: Measured on 2 cores (bench/fanout.py, 10,000 devices): 16 did 381 actions/s,
#: 8 did 370, 32 did 315 and 64 did 293. Past a few per core the processes only
#: take CPU from each other (and from the devices' side on one machine), and
#: each costs a fork, so a larger cap made starts slower, not fan-outs faster.
DEFAULT_MAX_PROCESSES = 16


@dataclass(frozen=True)
class Settings:
    """Everything configurable, resolved to concrete values."""

    home: Path
    store: str
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str | None = None
    signing_key: Path | None = None
    trusted_keys: tuple[Path, ...] = ()
    inventory: str = "inventory.json"
    result_sink: str = "-"
    max_processes: int = DEFAULT_MAX_PROCESSES
    event_log: str = ""
    max_coordinators: int = 8
    per_task_cap: int = 4
    topic_prefix: str = "mayfly"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        if env.get(ENV_HOME):
            home = Path(env[ENV_HOME]).expanduser()
        else:
            data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            home = Path(data).expanduser() / "mayfly"
        trusted = tuple(Path(p).expanduser() for p in env.get(ENV_TRUSTED_KEYS, "").split(":") if p)
        return cls(
            home=home,
            store=env.get(ENV_STORE) or str(home / "packages"),
            s3_endpoint=env.get(ENV_S3_ENDPOINT) or None,
            s3_access_key=env.get(ENV_S3_ACCESS_KEY) or None,
            s3_secret_key=env.get(ENV_S3_SECRET_KEY) or None,
            s3_region=env.get(ENV_S3_REGION) or None,
            signing_key=Path(env[ENV_SIGNING_KEY]).expanduser()
            if env.get(ENV_SIGNING_KEY)
            else None,
            trusted_keys=trusted,
            inventory=env.get(ENV_INVENTORY) or "inventory.json",
            result_sink=env.get(ENV_RESULT_SINK) or env.get(ENV_K_SINK) or "-",
            max_processes=_positive_int(env, ENV_MAX_PROCESSES, DEFAULT_MAX_PROCESSES),
            event_log=env.get(ENV_EVENT_LOG) or str(home / "events.db"),
            max_coordinators=_positive_int(env, ENV_MAX_COORDINATORS, 8),
            per_task_cap=_positive_int(env, ENV_PER_TASK_CAP, 4),
            topic_prefix=env.get(ENV_TOPIC_PREFIX) or "mayfly",
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with the given fields changed; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.home / "keys" / "signing.key"

    @property
    def trusted_key_paths(self) -> tuple[Path, ...]:
        return self.trusted_keys or (self.home / "trusted",)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def runtime_dir(self) -> Path:
        return self.home / "runtime"

    @property
    def package_cache(self) -> Path:
        return self.home / "cache" / "packages"

    @property
    def store_is_s3(self) -> bool:
        return self.store.startswith("s3://")

    @property
    def s3_bucket(self) -> str:
        bucket = self.store.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"{ENV_STORE}={self.store!r}: expected s3://BUCKET")
        return bucket


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name}={raw!r}: expected a positive whole number")
    return value
