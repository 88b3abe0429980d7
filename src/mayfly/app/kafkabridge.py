"""Kafka to HTTP as a Knative KafkaSource delivers, for clusters without its Kafka data plane.

Production reads Mayfly's topics with Knative's Kafka Broker and KafkaSource, whose data
plane is a Java program (knative/README.md). Where that cannot run (the one-node test
cluster of ``dev/services``), the ``local`` overlay runs this in a Knative ContainerSource
instead, which sets ``K_SINK`` to its sink (a lane's Broker, the aggregator):

    python -m mayfly.app.kafkabridge      # MAYFLY_BRIDGE_TOPIC, MAYFLY_BRIDGE_GROUP, K_SINK

It keeps a KafkaSource's promises: each record is sent as a binary-mode CloudEvent (its
``ce_*`` headers as ``ce-*``, its content type, and the W3C ``traceparent`` so the
receiver's spans join the request's trace), in offset order per partition, and its offset
is committed only once the sink answered 2xx: at least once. A sink that is down or
answers 5xx or 429 is retried with backoff, holding the partition, never skipping; a 4xx
is the sink refusing that event for good, which is logged and passed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import requests

from mayfly.app.wiring import open_event_log
from mayfly.errors import ConfigError
from mayfly.eventlog import LogConsumer, LogRecord
from mayfly.settings import Settings

__all__ = ["BridgeSettings", "http_headers", "run"]

log = logging.getLogger(__name__)

ENV_TOPIC = "MAYFLY_BRIDGE_TOPIC"
ENV_GROUP = "MAYFLY_BRIDGE_GROUP"
ENV_SINK = "K_SINK"
_FORWARDED = {
    "content-type": "Content-Type",
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_TIMEOUT_S = 660.0
"""A coordinator answers when its request is done: up to a revision's 600 s, plus margin."""

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110's token)."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""What an HTTP field value may not hold (horizontal tab aside)."""

Post = Callable[[Mapping[str, str], bytes], int]
"""Send one event (headers, body); return the HTTP status. Raises OSError when unreachable."""


@dataclass(frozen=True)
class BridgeSettings:
    topic: str
    group: str
    sink: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BridgeSettings:
        missing = [name for name in (ENV_TOPIC, ENV_GROUP, ENV_SINK) if not env.get(name)]
        if missing:
            raise ConfigError(f"kafkabridge: set {', '.join(missing)}")
        sink = env[ENV_SINK]
        if not sink.startswith(("http://", "https://")):
            raise ConfigError(f"kafkabridge: {ENV_SINK}={sink!r} is not an http(s) URL")
        return cls(topic=env[ENV_TOPIC], group=env[ENV_GROUP], sink=sink)


def http_headers(record: LogRecord) -> dict[str, str]:
    """The record's CloudEvent in HTTP binary mode: ``ce_id`` -> ``ce-id`` and so on.

    A header HTTP cannot carry (a name that is no token, a value with control
    characters, CR/LF above all) is left out and logged: sent, it would inject headers;
    refused by the HTTP client, it would be retried for ever and hold the partition. The
    receiver then judges the event without it (a missing ``ce-id``: a rejection).
    """
    headers: dict[str, str] = {}
    for name, value in record.headers:
        lowered = name.lower()
        text = value.decode("utf-8", errors="replace")
        if lowered.startswith("ce_"):
            target = f"ce-{lowered[3:]}"
        elif lowered in _FORWARDED:
            target = _FORWARDED[lowered]
        else:
            continue
        if not _TOKEN.fullmatch(target) or _CONTROL.search(text):
            log.warning(
                "kafkabridge: %s/%s@%s: header %r cannot go over HTTP; left out",
                record.topic,
                record.partition,
                record.offset,
                name[:100],
            )
            continue
        headers[target] = text
    return headers


def deliver(record: LogRecord, post: Post, stop: threading.Event) -> bool:
    """Send one record until the sink takes it or refuses it for good; False if stopped."""
    headers = http_headers(record)
    where = f"{record.topic}/{record.partition}@{record.offset}"
    for attempt in range(sys.maxsize):
        try:
            status = post(headers, record.value)
        except OSError as exc:
            status, why = 0, str(exc)
        else:
            why = f"HTTP {status}"
        if 200 <= status < 300:
            return True
        if 400 <= status < 500 and status != 429:
            log.warning("kafkabridge: the sink refused %s for good (%s); passing it", where, why)
            return True
        delay = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
        log.warning("kafkabridge: %s not delivered (%s); again in %.1fs", where, why, delay)
        if stop.wait(delay):
            return False
    return False  # pragma: no cover - the range does not end


def run(consumer: LogConsumer, post: Post, stop: threading.Event, *, batch: int = 50) -> int:
    """Forward records until ``stop`` is set; return how many were delivered."""
    delivered = 0
    while not stop.is_set():
        records = consumer.poll(max_records=batch, timeout_s=1.0)
        done: dict[int, int] = {}
        stopped = False
        for record in records:
            if not deliver(record, post, stop):
                stopped = True  # what was not committed is read again on restart
                break
            done[record.partition] = record.offset + 1
            delivered += 1
        if done:
            consumer.commit(done)
        if stopped:
            break
    return delivered


def _http_post(url: str) -> Post:
    session = requests.Session()

    def post(headers: Mapping[str, str], body: bytes) -> int:
        try:
            response = session.post(url, headers=dict(headers), data=body, timeout=_TIMEOUT_S)
        except requests.RequestException as exc:
            raise OSError(str(exc)) from exc
        response.close()
        return response.status_code

    return post


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        bridge = BridgeSettings.from_env(os.environ)
        settings = Settings.from_env()
        if not settings.event_log_is_kafka:
            raise ConfigError("kafkabridge: MAYFLY_EVENT_LOG must name Kafka (kafka://HOST:PORT)")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    event_log = open_event_log(settings)
    consumer = event_log.consumer(bridge.group, bridge.topic)
    log.info("kafkabridge: %s (group %s) -> %s", bridge.topic, bridge.group, bridge.sink)
    started = time.monotonic()
    try:
        count = run(consumer, _http_post(bridge.sink), stop)
    finally:
        consumer.close()
        event_log.close()
    log.info("kafkabridge: %d delivered in %.0fs; stopped", count, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
