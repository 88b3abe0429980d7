"""Several runtimes on one Kafka: they split the requests, and each runs once.

Each runtime is a real ``mayfly up`` with a home of its own (its own state
and archive, the same packages), as on separate machines; the later ones
join while the first is busy, so partitions move mid-stream. What a user
would notice if the split were wrong is checked on the devices themselves:
an action applied twice, an action arriving twice (a request run again,
even if the device deduped it), or one device's changes out of order.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from mayfly.devices.sim import SimulatorServer
from mayfly.eventlog.kafka import KafkaEventLog
from mayfly.events import TaskCompleted, TaskProgress, TaskRejected, from_kafka
from mayfly.topics import Topics

from .conftest import Home, config_pushes

FleetFactory = Callable[..., SimulatorServer]

REQUESTS = 2_000
DEVICES = 100


def _publish(bootstrap: str, topics: Topics, devices: list[str]) -> list[str]:
    with KafkaEventLog(bootstrap) as log:
        return config_pushes(log, topics, devices, REQUESTS)


def _results(bootstrap: str, topics: Topics, want: int, timeout_s: float) -> Counter[str]:
    """Result records per request id on the results topic, once ``want`` ids have one."""
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    with KafkaEventLog(bootstrap) as log:
        consumer = log.consumer(f"check-{uuid.uuid4().hex[:8]}", topics.results)
        while len(counts) < want and time.monotonic() < deadline:
            for record in consumer.poll(1000, 1.0):
                event = from_kafka(record.headers, record.key, record.value)
                if isinstance(event, TaskProgress):
                    continue  # news of a running request, not an outcome
                assert isinstance(event, TaskCompleted | TaskRejected)
                assert isinstance(event, TaskCompleted), f"rejected: {event}"
                counts[event.request_id] += 1
        # Anything late (a second run) has time to land too.
        for record in consumer.poll(1000, 2.0):
            event = from_kafka(record.headers, record.key, record.value)
            if not isinstance(event, TaskProgress):
                counts[str(event.request_id)] += 1  # type: ignore[union-attr]
    return counts


def _copy_home(home: Home, name: str) -> Home:
    other = Home(root=home.root.parent / name, inventory=home.inventory)
    shutil.copytree(home.root, other.root)
    return other


@pytest.mark.kafka
@pytest.mark.parametrize("runtimes", [2, 3])
def test_runtimes_on_one_kafka_split_the_requests_and_run_each_once(
    home: Home, fleet: FleetFactory, kafka_bootstrap: str, runtimes: int
) -> None:
    server = fleet(DEVICES)
    prefix = f"mayfly-scale-{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    kafka = {"MAYFLY_EVENT_LOG": f"kafka://{kafka_bootstrap}", "MAYFLY_TOPIC_PREFIX": prefix}
    homes = [home] + [_copy_home(home, f"home{i}") for i in range(1, runtimes)]
    processes = []

    def start(h: Home) -> None:
        process = h.up_with("-v", output=h.root / "up.log", **kafka)
        home.processes.append(process)  # the fixture kills what is left
        processes.append(process)

    start(homes[0])
    devices = server.simulator.device_ids()
    published: list[str] = []
    publisher = threading.Thread(
        target=lambda: published.extend(_publish(kafka_bootstrap, topics, devices))
    )
    publisher.start()
    # The others join while the first is busy: partitions move mid-stream.
    for later in homes[1:]:
        time.sleep(4)
        start(later)
    publisher.join(timeout=120)
    counts = _results(kafka_bootstrap, topics, REQUESTS, timeout_s=240)
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=60)
    outputs = [(h.root / "up.log").read_text(errors="replace") for h in homes]

    assert len(published) == REQUESTS
    tails = "\n".join(out[-3000:] for out in outputs)
    assert set(counts) == set(published), f"{REQUESTS - len(counts)} have no result:\n{tails}"
    twice = {rid: n for rid, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} requests have more than one result: {list(twice.items())[:5]}"
    sim = server.simulator
    assert sim.duplicates() == []
    records = {device: sim.records(device) for device in devices}
    again = [(d, k, n) for d, r in records.items() for k, n in r["arrivals"].items() if n > 1]
    assert not again, f"{len(again)} actions arrived more than once (run again): {again[:5]}"
    for device, record in records.items():
        sent = [entry["payload"]["config"]["telemetry_interval_s"] for entry in record["log"]]
        assert sent == sorted(sent), f"{device} changed out of order: {sent}"
        assert len(sent) == REQUESTS // DEVICES
    # Work was split: every runtime started requests of its own.
    started = [out.count(" INFO started ") for out in outputs]
    assert all(n > 0 for n in started), f"requests started per runtime: {started}\n{outputs}"
    assert sum(started) == REQUESTS, f"requests started per runtime: {started}"
