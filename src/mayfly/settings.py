"""Settings, read once at the edge from the environment and CLI flags.

:data:`OPTIONS` is the one list of everything a user can configure: each
option's field, environment variable, CLI flag and meaning. The CLI makes its
flags from it (``mayfly.cli._common.settings_options``), the README's table
lists it, and :meth:`Settings.from_env` reads it. A flag wins over its
variable. Nothing else in Mayfly reads the environment for these, and nothing
writes to it.

Run ``mayfly up --help`` (or any command's) to see each flag with its variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mayfly.errors import ConfigError
from mayfly.sandbox.secrets import private
from mayfly.topics import DEFAULT_PREFIX, Topics

__all__ = [
    "DEFAULT_MAX_PROCESSES",
    "DEFAULT_SHARD_SIZE",
    "ENV_ARCHIVE",
    "ENV_COORDINATOR_MODE",
    "ENV_DEFER_SINK",
    "ENV_EVENT_LOG",
    "ENV_HOME",
    "ENV_INVENTORY",
    "ENV_JAEGER_URL",
    "ENV_K_SINK",
    "ENV_MAX_COORDINATORS",
    "ENV_MAX_PROCESSES",
    "ENV_METRICS_EXPORTER",
    "ENV_OTLP_ENDPOINT",
    "ENV_OTLP_METRICS_ENDPOINT",
    "ENV_PER_TASK_CAP",
    "ENV_RESULT_SINK",
    "ENV_S3_ACCESS_KEY",
    "ENV_S3_ENDPOINT",
    "ENV_S3_REGION",
    "ENV_S3_SECRET_KEY",
    "ENV_SHARD_SINK",
    "ENV_SHARD_SIZE",
    "ENV_SIGNING_KEY",
    "ENV_STORE",
    "ENV_TASK_WEIGHTS",
    "ENV_TOPIC_PREFIX",
    "ENV_TRACE_FILE",
    "ENV_TRUSTED_KEYS",
    "OPTIONS",
    "Option",
    "Settings",
    "option",
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
ENV_SHARD_SIZE = "MAYFLY_SHARD_SIZE"
ENV_SHARD_SINK = "MAYFLY_SHARD_SINK"
ENV_DEFER_SINK = "MAYFLY_DEFER_SINK"
ENV_EVENT_LOG = "MAYFLY_EVENT_LOG"
ENV_MAX_COORDINATORS = "MAYFLY_MAX_COORDINATORS"
ENV_PER_TASK_CAP = "MAYFLY_PER_TASK_CAP"
ENV_TASK_WEIGHTS = "MAYFLY_TASK_WEIGHTS"
ENV_COORDINATOR_MODE = "MAYFLY_COORDINATOR_MODE"
ENV_TOPIC_PREFIX = "MAYFLY_TOPIC_PREFIX"
ENV_ARCHIVE = "MAYFLY_ARCHIVE"
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_OTLP_METRICS_ENDPOINT = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
ENV_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"
ENV_TRACE_FILE = "MAYFLY_TRACE_FILE"
ENV_JAEGER_URL = "MAYFLY_JAEGER_URL"

#: Task processes per coordinator unless MAYFLY_MAX_PROCESSES says otherwise.
#: Measured on 2 cores (bench/fanout.py, 10,000 devices): 16 did 381 actions/s,
#: 8 did 370, 32 did 315 and 64 did 293. Past a few per core the processes only
#: take CPU from each other (and from the devices' side on one machine), and
#: each costs a fork, so a larger cap made starts slower, not fan-outs faster.
DEFAULT_MAX_PROCESSES = 16
#: Devices one coordinator runs at most unless MAYFLY_SHARD_SIZE says otherwise.
DEFAULT_SHARD_SIZE = 10_000

Kind = Literal["text", "path", "count", "paths"]


@dataclass(frozen=True)
class Option:
    """One configurable setting: where it is read from and what it means."""

    field: str
    """The :class:`Settings` attribute."""
    env: str
    flag: str | None
    """The CLI flag; ``None`` for a secret, which a flag would show in ``ps``, and for
    what only job mode and the functions read (they take no flags)."""
    help: str
    default: str
    """The default, as the README and ``--help`` show it."""
    kind: Kind = "text"


OPTIONS: tuple[Option, ...] = (
    Option("home", ENV_HOME, "--home", "Mayfly's folder: keys, local store, caches, runtime state",
           "$XDG_DATA_HOME/mayfly or ~/.local/share/mayfly", "path"),
    Option("store", ENV_STORE, "--store", "package store: a folder, or s3://BUCKET",
           "$MAYFLY_HOME/packages"),
    Option("s3_endpoint", ENV_S3_ENDPOINT, "--s3-endpoint",
           "S3 endpoint URL, e.g. http://127.0.0.1:8333", "none"),
    Option("s3_access_key", ENV_S3_ACCESS_KEY, "--s3-access-key", "S3 access key", "none"),
    Option("s3_secret_key", ENV_S3_SECRET_KEY, None,
           "S3 secret key (the variable only: a flag would show in the process list)", "none"),
    Option("s3_region", ENV_S3_REGION, "--s3-region", "S3 region", "none"),
    Option("signing_key", ENV_SIGNING_KEY, "--key", "private key for signing packages",
           "$MAYFLY_HOME/keys/signing.key", "path"),
    Option("trusted_keys", ENV_TRUSTED_KEYS, "--trusted",
           "trusted public keys: files or folders (the variable `:`-separated, the flag "
           "repeatable)", "$MAYFLY_HOME/trusted", "paths"),
    Option("inventory", ENV_INVENTORY, "--inventory",
           "device inventory: a file or s3://BUCKET/KEY", "inventory.json"),
    Option("result_sink", ENV_RESULT_SINK, None,
           "where job mode and the coordinator function deliver results: -, a file, "
           "http(s)://..., kafka://HOST:PORT/TOPIC (the variable only: no command "
           "delivers results)", "$K_SINK, else -"),
    Option("max_processes", ENV_MAX_PROCESSES, "--max-processes",
           "task processes per coordinator at most", str(DEFAULT_MAX_PROCESSES), "count"),
    Option("shard_size", ENV_SHARD_SIZE, "--shard-size",
           "devices one coordinator runs at most: a request over more runs in shards, "
           "each in a coordinator of its own (a request's rollout.shard_size wins)",
           str(DEFAULT_SHARD_SIZE), "count"),
    Option("shard_sink", ENV_SHARD_SINK, None,
           "where the coordinator function publishes shards: kafka://HOST:PORT (the "
           "lanes), or an http(s) URL in which {priority} names the lane (the variable "
           "only; the local runtime uses its own log)", "none: no sharding"),
    Option("defer_sink", ENV_DEFER_SINK, None,
           "where the coordinator function puts a request its schedule holds: the "
           "http(s) URL of the deferred topic's KafkaSink, which the waker function "
           "empties (the variable only)", "none: answered 503 with Retry-After"),
    Option("event_log", ENV_EVENT_LOG, "--event-log",
           "event log: a SQLite file, or kafka://HOST:PORT[,HOST:PORT]",
           "$MAYFLY_HOME/events.db"),
    Option("topic_prefix", ENV_TOPIC_PREFIX, "--topic-prefix",
           "prefix of every topic (PREFIX.requests.high, PREFIX.results and the rest)",
           DEFAULT_PREFIX),
    Option("max_coordinators", ENV_MAX_COORDINATORS, "--max-coordinators",
           "requests running at once (each in its coordinator process)", "8", "count"),
    Option("per_task_cap", ENV_PER_TASK_CAP, "--per-task-cap",
           "requests of one task type running at once", "4", "count"),
    Option("task_weights", ENV_TASK_WEIGHTS, "--task-weights",
           "shares of the coordinators between task types inside a lane, as "
           "TYPE=WEIGHT,... (a type not named weighs 1)", ""),
    Option("coordinator_mode", ENV_COORDINATOR_MODE, "--coordinator-mode",
           "serve: a coordinator runs the queued requests of its task type one after "
           "another and exits when none is waiting; strict: one coordinator process per "
           "request", "serve"),
    Option("archive", ENV_ARCHIVE, "--archive",
           "results archive: a folder or s3://BUCKET[/PREFIX]", "$MAYFLY_HOME/archive"),
    Option("otlp_endpoint", ENV_OTLP_ENDPOINT, "--otlp-endpoint",
           "OTLP/HTTP endpoint for traces, e.g. http://127.0.0.1:4318 (Jaeger)",
           "none: the trace file"),
    Option("otlp_metrics_endpoint", ENV_OTLP_METRICS_ENDPOINT, "--otlp-metrics-endpoint",
           "full OTLP/HTTP metrics URL (OTEL_METRICS_EXPORTER=otlp: the endpoint's "
           "/v1/metrics)", "none: no metrics leave the process"),
    Option("trace_file", ENV_TRACE_FILE, "--trace-file",
           "OTLP-JSON trace file when no OTLP endpoint is set",
           "$MAYFLY_HOME/telemetry/traces.jsonl", "path"),
    Option("jaeger_url", ENV_JAEGER_URL, "--jaeger-url",
           "Jaeger's UI, to link each request's trace, e.g. http://127.0.0.1:16686",
           "none: the trace id alone"),
)  # fmt: skip

_BY_FIELD = {o.field: o for o in OPTIONS}


def option(field: str) -> Option:
    """The option behind a :class:`Settings` field."""
    return _BY_FIELD[field]


@dataclass(frozen=True)
class Settings:
    """Everything configurable, resolved to concrete values (see :data:`OPTIONS`)."""

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
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_sink: str | None = None
    defer_sink: str | None = None
    """The coordinator function's KafkaSink of the deferred topic (Knative)."""
    event_log: str = ""
    max_coordinators: int = 8
    per_task_cap: int = 4
    task_weights: tuple[tuple[str, int], ...] = ()
    """Each task type's weight in the fair share of coordinators (others: 1)."""
    coordinator_mode: str = "serve"
    topic_prefix: str = DEFAULT_PREFIX
    archive: str = ""
    otlp_endpoint: str | None = None
    otlp_metrics_endpoint: str | None = None
    trace_file: Path | None = None
    jaeger_url: str | None = None

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Resolve every setting: a flag, else its variable, else its default.

        Args:
            environ: defaults to ``os.environ``.
            flags: CLI values by field name; ``None`` and empty values are unset.

        Raises:
            ConfigError: a value that cannot be used, naming its variable.
        """
        env = dict(os.environ if environ is None else environ)
        for name, value in (flags or {}).items():
            if value is None or value == () or value == "":
                continue
            opt = option(name)
            env[opt.env] = ":".join(str(v) for v in value) if opt.kind == "paths" else str(value)
        if env.get(ENV_HOME):
            home = Path(env[ENV_HOME]).expanduser()
        else:
            data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
            home = Path(data).expanduser() / "mayfly"
        trusted = tuple(Path(p).expanduser() for p in env.get(ENV_TRUSTED_KEYS, "").split(":") if p)
        metrics_endpoint = env.get(ENV_OTLP_METRICS_ENDPOINT) or None
        endpoint = env.get(ENV_OTLP_ENDPOINT) or None
        if metrics_endpoint is None and endpoint and env.get(ENV_METRICS_EXPORTER) == "otlp":
            metrics_endpoint = endpoint  # configure_telemetry appends /v1/metrics
        return cls(
            home=home,
            store=env.get(ENV_STORE) or str(home / "packages"),
            s3_endpoint=env.get(ENV_S3_ENDPOINT) or None,
            s3_access_key=env.get(ENV_S3_ACCESS_KEY) or None,
            # A private copy: task processes forked from this one wipe it in place.
            s3_secret_key=private(env.get(ENV_S3_SECRET_KEY)),
            s3_region=env.get(ENV_S3_REGION) or None,
            signing_key=_path(env, ENV_SIGNING_KEY),
            trusted_keys=trusted,
            inventory=env.get(ENV_INVENTORY) or "inventory.json",
            result_sink=env.get(ENV_RESULT_SINK) or env.get(ENV_K_SINK) or "-",
            max_processes=_positive_int(env, ENV_MAX_PROCESSES, DEFAULT_MAX_PROCESSES),
            shard_size=_positive_int(env, ENV_SHARD_SIZE, DEFAULT_SHARD_SIZE),
            shard_sink=env.get(ENV_SHARD_SINK) or None,
            defer_sink=env.get(ENV_DEFER_SINK) or None,
            event_log=env.get(ENV_EVENT_LOG) or str(_home_event_log(home)),
            max_coordinators=_positive_int(env, ENV_MAX_COORDINATORS, 8),
            per_task_cap=_positive_int(env, ENV_PER_TASK_CAP, 4),
            task_weights=_task_weights(env),
            coordinator_mode=_one_of(env, ENV_COORDINATOR_MODE, ("serve", "strict")),
            topic_prefix=_prefix(env),
            archive=env.get(ENV_ARCHIVE) or str(home / "archive"),
            otlp_endpoint=endpoint,
            otlp_metrics_endpoint=metrics_endpoint,
            trace_file=None
            if endpoint
            else (_path(env, ENV_TRACE_FILE) or home / "telemetry" / "traces.jsonl"),
            jaeger_url=env.get(ENV_JAEGER_URL) or None,
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
    def wheel_cache(self) -> Path:
        """The wheels package builds resolved their dependencies to."""
        return self.home / "cache" / "wheels"

    @property
    def store_is_s3(self) -> bool:
        return self.store.startswith("s3://")

    @property
    def home_event_log(self) -> Path:
        """The embedded log of the home, where it is when no other is set."""
        return _home_event_log(self.home)

    @property
    def event_log_is_kafka(self) -> bool:
        return self.event_log.startswith("kafka://")

    @property
    def messaging_system(self) -> str:
        """``messaging.system`` of the event log: ``kafka`` or ``sqlite``."""
        return "kafka" if self.event_log_is_kafka else "sqlite"

    @property
    def s3_bucket(self) -> str:
        bucket = self.store.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise ConfigError(f"{ENV_STORE}={self.store!r}: expected s3://BUCKET")
        return bucket


def _one_of(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name)
    if not raw:
        return choices[0]
    if raw.strip().lower() not in choices:
        raise ConfigError(f"{name}={raw[:40]!r}: expected one of {', '.join(choices)}")
    return raw.strip().lower()


#: A task type's weight is at most this: a share is a ratio, not a priority.
MAX_TASK_WEIGHT = 1000
_TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def _task_weights(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    raw = env.get(ENV_TASK_WEIGHTS, "").strip()
    if not raw:
        return ()
    weights: dict[str, int] = {}
    for part in raw.split(","):
        name, _, weight = part.strip().partition("=")
        if not _TASK_NAME.match(name) or not weight.isdigit():
            raise ConfigError(
                f"{ENV_TASK_WEIGHTS}={raw!r}: expected TYPE=WEIGHT,... (reboot=1,firmware-update=3)"
            )
        if not 1 <= int(weight) <= MAX_TASK_WEIGHT or name in weights:
            raise ConfigError(
                f"{ENV_TASK_WEIGHTS}={raw!r}: {name} needs one weight from 1 to {MAX_TASK_WEIGHT}"
            )
        weights[name] = int(weight)
    return tuple(sorted(weights.items()))


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


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw).expanduser() if raw else None


def _prefix(env: Mapping[str, str]) -> str:
    raw = env.get(ENV_TOPIC_PREFIX) or DEFAULT_PREFIX
    # Kafka topic names: letters, digits, '.', '_', '-'; the prefix adds '.requests.high'.
    if len(raw) > 200 or not all(c.isalnum() or c in "._-" for c in raw):
        raise ConfigError(f"{ENV_TOPIC_PREFIX}={raw!r}: use letters, digits, '.', '_' or '-'")
    return raw


def _home_event_log(home: Path) -> Path:
    return home / "events.db"
