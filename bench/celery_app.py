"""The Celery baseline: persistent workers doing the benchmark's device action.

A Redis broker and result backend (``MAYFLY_BENCH_REDIS``), and one task that
does what a Mayfly coordinator does for one device: one ``config-push`` POST
with an ``Idempotency-Key``, through the same HTTP driver, so the comparison
is of the machinery around the action, not of two HTTP clients.

    celery -A celery_app worker   # with bench/ on the path; bench/pipeline.py does it
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from mayfly.devices import Device
from mayfly.devices.http import HttpDriver

_BROKER = os.environ.get("MAYFLY_BENCH_REDIS", "redis://127.0.0.1:6379/0")
_PAYLOAD = {"config": {"log_level": "info"}, "mode": "merge"}

app = Celery("mayfly_bench", broker=_BROKER, backend=_BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_driver: HttpDriver | None = None


@app.task(name="bench.push")
def push(device_id: str, address: str, key: str) -> Any:
    global _driver
    if _driver is None:  # one per worker process, made after the fork
        _driver = HttpDriver()
    device = Device(id=device_id, address=address, capabilities=("config",))
    return _driver.action(device, "config-push", _PAYLOAD, key)["action"]
