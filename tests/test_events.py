"""The event contract: schemas, encodings, validation errors, split results."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cloudevents import conversion as ce_conversion
from cloudevents import kafka as ce_kafka
from cloudevents.http import CloudEvent
from cloudevents.http import from_http as sdk_from_http
from pydantic import ValidationError

from mayfly.errors import EventError, IntegrityError, PackageNotFoundError
from mayfly.events import (
    MAX_EVENT_BYTES,
    MAX_PROGRESS_DEVICES,
    STRUCTURED_CONTENT_TYPE,
    CoordinatorInfo,
    DeviceResult,
    DeviceStatus,
    DeviceUpdate,
    MayflyEvent,
    OverallStatus,
    PackageRef,
    Part,
    Priority,
    RejectionCode,
    Rollout,
    Shard,
    TaskCancel,
    TaskCompleted,
    TaskProgress,
    TaskRejected,
    TaskRequest,
    Timings,
    from_cloudevent,
    from_http,
    from_kafka,
    merge_completed,
    new_request,
    partition_key_for,
    peek_attributes,
    rejection_for,
    shard_request,
    split_completed,
    to_cloudevent,
    to_http,
    to_kafka,
    to_kafka_record,
)
from mayfly.events._base import validate_model
from mayfly.events.codec import Mode

DATA = Path(__file__).parent / "data"
KAFKA_LIMIT = 1_048_576  # Kafka's default max.message.bytes / message.max.bytes

REQUEST_ID = "3f2c1e9a-8d4b-4b7e-9a51-2c6f0e7d1a42"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "mayfly=publisher,congo=t61rcWkgMzE"
DIGEST = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
T0 = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the models behind the golden files --------------------------------------


def golden_request() -> TaskRequest:
    return TaskRequest(
        id=REQUEST_ID,
        time=T0,
        priority=Priority.HIGH,
        partition_key=REQUEST_ID,
        traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
        task="firmware-update",
        version="2.4.1",
        devices=("sensor-0001", "sensor-0002"),
        selector={"site": "lyon", "model": "tx-200"},
        params={"image": "fw-2.4.1.bin", "reboot": True, "retries": 2},
        deadline=datetime(2025, 3, 14, 10, 0, tzinfo=UTC),
        rollout=Rollout(max_parallel=50, max_failure_ratio=0.1),
    )


def golden_single_device_request() -> TaskRequest:
    return TaskRequest(
        id="7d1e0c55-0b8e-4a8f-a3c9-5d2b9f6e4c10",
        time=T0,
        partition_key="sensor-0001",
        traceparent=TRACEPARENT,
        task="reboot",
        channel="stable",
        devices=("sensor-0001",),
    )


def device_result(device_id: str, output: Any = None) -> DeviceResult:
    return DeviceResult(
        device_id=device_id,
        status=DeviceStatus.SUCCEEDED,
        started_at=at(1.25),
        finished_at=at(2.5),
        attempts=1,
        output=output,
    )


def completed(devices: tuple[DeviceResult, ...]) -> TaskCompleted:
    return TaskCompleted(
        time=at(12),
        priority=Priority.HIGH,
        traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
        request_id=REQUEST_ID,
        request_source="/mayfly/publisher",
        task="firmware-update",
        package=PackageRef(name="firmware-update", version="2.4.1", digest=DIGEST),
        status=OverallStatus.PARTIAL,
        devices=devices,
        timings=Timings(
            published_at=at(0),
            received_at=at(0.5),
            started_at=at(1),
            finished_at=at(11),
            cold_start_ms=8.5,
        ),
        coordinator=CoordinatorInfo(id="coord-7f3a", host="node-2", pid=4242, mode="local"),
    )


def golden_completed() -> TaskCompleted:
    return completed(
        (
            device_result("sensor-0001", {"firmware": "2.4.1", "rebooted": True}),
            DeviceResult(
                device_id="sensor-0002",
                status=DeviceStatus.TIMED_OUT,
                started_at=at(1.25),
                finished_at=at(11),
                attempts=3,
                error="no answer within 3s",
            ),
            DeviceResult(device_id="sensor-0003", status=DeviceStatus.SKIPPED),
        )
    )


def golden_rejected() -> TaskRejected:
    return TaskRejected(
        id=f"{REQUEST_ID}:rejected",
        time=at(1),
        priority=Priority.HIGH,
        traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
        request_id=REQUEST_ID,
        reason="firmware-updater: no such package",
        code=RejectionCode.UNKNOWN_TASK,
        task="firmware-updater",
        original={
            "specversion": "1.0",
            "id": REQUEST_ID,
            "source": "/mayfly/publisher",
            "type": "dev.mayfly.task.requested",
            "tasktype": "firmware-updater",
        },
    )


def golden_progress() -> TaskProgress:
    return TaskProgress(
        time=at(4),
        priority=Priority.HIGH,
        traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
        request_id=REQUEST_ID,
        task="firmware-update",
        coordinator="coord-7f3a",
        seq=6,
        started_at=at(1),
        devices_total=3,
        counts={DeviceStatus.SUCCEEDED: 1, DeviceStatus.RUNNING: 1, DeviceStatus.SKIPPED: 1},
        devices=(
            DeviceUpdate(
                device_id="sensor-0002",
                status=DeviceStatus.RUNNING,
                percent=40.0,
                message="downloading 2.4.1",
                attempt=2,
            ),
        ),
    )


def golden_cancel() -> TaskCancel:
    return TaskCancel(
        id="b1d4f0c2-6a1e-4c3b-8f7d-2e9a5c0b1d33",
        time=at(5),
        traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
        request_id=REQUEST_ID,
        grace_s=30.0,
        reason="wrong firmware",
    )


GOLDEN_STRUCTURED: dict[str, Callable[[], MayflyEvent]] = {
    "requested.json": golden_request,
    "completed.json": golden_completed,
    "rejected.json": golden_rejected,
    "progress.json": golden_progress,
    "cancel.json": golden_cancel,
}
MODELS: dict[str, Callable[[], MayflyEvent]] = {
    "requested": golden_request,
    "completed": golden_completed,
    "rejected": golden_rejected,
    "progress": golden_progress,
    "cancel": golden_cancel,
}


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def kafka_golden() -> tuple[dict[str, bytes], bytes, bytes]:
    record = load("requested.kafka-binary.json")
    headers = {name: value.encode() for name, value in record["headers"].items()}
    return headers, record["key"].encode(), record["value"].encode()


# --- golden events ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_STRUCTURED))
def test_golden_structured_event_decodes_to_its_model(name: str) -> None:
    body = (DATA / name).read_bytes()

    over_http = from_http({"Content-Type": STRUCTURED_CONTENT_TYPE}, body)
    over_kafka = from_kafka({"content-type": b"application/cloudevents+json"}, None, body)

    assert over_http == GOLDEN_STRUCTURED[name]()
    assert over_kafka == over_http


@pytest.mark.parametrize("name", sorted(GOLDEN_STRUCTURED))
def test_model_encodes_to_golden_structured_event(name: str) -> None:
    headers, body = to_http(GOLDEN_STRUCTURED[name](), "structured")

    assert headers == {"content-type": "application/cloudevents+json; charset=utf-8"}
    assert json.loads(body) == load(name)


def test_golden_request_field_values() -> None:
    request = from_http({}, (DATA / "requested.json").read_bytes())

    assert isinstance(request, TaskRequest)
    assert request.id == REQUEST_ID
    assert request.tasktype == request.task == "firmware-update"
    assert request.priority is Priority.HIGH
    assert request.devices == ("sensor-0001", "sensor-0002")
    assert request.selector == {"site": "lyon", "model": "tx-200"}
    assert request.version == "2.4.1"
    assert request.channel is None
    assert request.rollout == Rollout(max_parallel=50, max_failure_ratio=0.1)
    assert request.deadline == datetime(2025, 3, 14, 10, tzinfo=UTC)
    assert (request.traceparent, request.tracestate) == (TRACEPARENT, TRACESTATE)


def test_golden_completed_field_values() -> None:
    result = from_http({}, (DATA / "completed.json").read_bytes())

    assert isinstance(result, TaskCompleted)
    assert result.id == f"{REQUEST_ID}:completed:0"
    assert result.partition_key == REQUEST_ID
    assert result.package.digest == DIGEST
    assert [d.status for d in result.devices] == ["succeeded", "timed_out", "skipped"]
    assert result.devices[0].output == {"firmware": "2.4.1", "rebooted": True}
    assert result.devices[1].error == "no answer within 3s"
    assert result.devices[1].attempts == 3
    assert result.timings.cold_start_ms == 8.5
    assert result.coordinator.pid == 4242
    assert result.part == Part(index=0, count=1)


def test_golden_progress_field_values() -> None:
    progress = from_http({}, (DATA / "progress.json").read_bytes())

    assert isinstance(progress, TaskProgress)
    assert progress.id == f"{REQUEST_ID}:progress:coord-7f3a:6"
    assert progress.partition_key == REQUEST_ID  # the result's partition: it comes first
    assert progress.done == 2
    assert progress.devices[0].percent == 40.0


def test_a_progress_event_is_bounded_in_devices_and_message() -> None:
    base = golden_progress()
    many = tuple(
        DeviceUpdate(device_id=f"d{i}", status=DeviceStatus.RUNNING)
        for i in range(MAX_PROGRESS_DEVICES + 1)
    )
    with pytest.raises(ValidationError):
        TaskProgress.model_validate(base.model_dump() | {"devices": many})
    with pytest.raises(ValidationError):
        DeviceUpdate(device_id="d", status=DeviceStatus.RUNNING, message="x" * 201)


def test_golden_rejected_field_values() -> None:
    rejected = from_http({}, (DATA / "rejected.json").read_bytes())

    assert isinstance(rejected, TaskRejected)
    assert rejected.code is RejectionCode.UNKNOWN_TASK
    assert rejected.request_id == REQUEST_ID
    assert rejected.original["tasktype"] == "firmware-updater"
    assert rejected.traceparent == TRACEPARENT


def test_golden_kafka_binary_record_decodes() -> None:
    headers, key, value = kafka_golden()
    expected = golden_single_device_request()

    assert from_kafka(headers, key, value) == expected
    # kafka-python hands headers over as a list of (str, bytes) pairs
    assert from_kafka(list(headers.items()), key, value) == expected
    # header names are case-insensitive
    assert from_kafka({k.upper(): v for k, v in headers.items()}, key, value) == expected
    assert from_kafka(ce_kafka.KafkaMessage(headers, key, value)) == expected


def test_model_encodes_to_golden_kafka_binary_record() -> None:
    headers, key, value = kafka_golden()

    message = to_kafka(golden_single_device_request())

    assert message.headers == headers
    assert message.key == key
    assert message.value == value


# --- round trips ----------------------------------------------------------------


def via_kafka(model: MayflyEvent, mode: str) -> MayflyEvent:
    message = to_kafka(model, mode)  # type: ignore[arg-type]
    assert message.key == model.partition_key.encode()
    return from_kafka(message)


def via_http(model: MayflyEvent, mode: str) -> MayflyEvent:
    headers, body = to_http(model, mode)  # type: ignore[arg-type]
    return from_http(headers, body)


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("transport", [via_kafka, via_http], ids=["kafka", "http"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_event_type_round_trips(
    kind: str, transport: Callable[[MayflyEvent, str], MayflyEvent], mode: str
) -> None:
    model = MODELS[kind]()

    decoded = transport(model, mode)

    assert decoded == model
    assert type(decoded) is type(model)
    assert (decoded.traceparent, decoded.tracestate) == (TRACEPARENT, TRACESTATE)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cloudevent_round_trip(kind: str) -> None:
    model = MODELS[kind]()

    event = to_cloudevent(model)

    assert event["type"] == model.event_type
    assert event["traceparent"] == TRACEPARENT
    assert from_cloudevent(event) == model
    assert from_kafka(to_kafka(event)) == model


def test_binary_kafka_puts_partition_key_in_record_key_and_attributes_in_headers() -> None:
    message = to_kafka(golden_request())

    assert message.key == REQUEST_ID.encode()
    assert message.headers["content-type"] == b"application/json"
    assert message.headers["ce_tasktype"] == b"firmware-update"
    assert message.headers["ce_priority"] == b"high"
    assert message.headers["ce_traceparent"] == TRACEPARENT.encode()
    assert message.headers["ce_tracestate"] == TRACESTATE.encode()


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_kafka_records_carry_the_trace_context_as_plain_w3c_headers(mode: Mode) -> None:
    # Knative's Kafka data plane parents its delivery spans on these headers.
    key, value, headers = to_kafka_record(golden_request(), mode)
    assert ("traceparent", TRACEPARENT.encode()) in headers
    assert ("tracestate", TRACESTATE.encode()) in headers
    assert from_kafka(headers, key, value) == golden_request()  # and decoders ignore them

    untraced = new_request("reboot", devices=["d1"])
    assert not [n for n, _ in to_kafka_record(untraced)[2] if n in ("traceparent", "tracestate")]


def test_structured_kafka_declares_cloudevents_content_type() -> None:
    message = to_kafka(golden_request(), "structured")

    assert message.headers == {"content-type": b"application/cloudevents+json; charset=utf-8"}
    assert json.loads(message.value)["partitionkey"] == REQUEST_ID


# --- interoperability with the CloudEvents SDK (other producers and consumers) ---


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_sdk_reads_what_we_write(kind: str) -> None:
    model = MODELS[kind]()
    attributes = model.cloudevent_attributes()

    from_binary_kafka = ce_kafka.from_binary(to_kafka(model))
    from_binary_http = sdk_from_http(*to_http(model, "binary"))
    from_structured_http = sdk_from_http(*to_http(model, "structured"))

    for event in (from_binary_http, from_structured_http):
        assert dict(event.get_attributes()) == attributes
        assert event.get_data() == model.cloudevent_data()
    kafka_attributes = dict(from_binary_kafka.get_attributes())
    assert kafka_attributes.pop("partitionkey") == model.partition_key.encode()
    assert kafka_attributes == {k: v for k, v in attributes.items() if k != "partitionkey"}
    assert from_binary_kafka.get_data() == model.cloudevent_data()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_we_read_what_the_sdk_writes(kind: str) -> None:
    model = MODELS[kind]()
    event = to_cloudevent(model)

    assert from_http(*ce_conversion.to_binary(event)) == model
    assert from_http(*ce_conversion.to_structured(event)) == model
    assert from_kafka(ce_kafka.to_binary(event)) == model
    # The SDK's structured Kafka record says application/json, not
    # application/cloudevents+json; its value is still a structured event.
    assert from_kafka(ce_kafka.to_structured(event)) == model


def test_foreign_producer_minimal_request_gets_defaults() -> None:
    # What another language's SDK might send: no extensions, no optional data.
    headers = {
        "ce_specversion": b"1.0",
        "ce_id": b"req-1",
        "ce_source": b"urn:other-sdk",
        "ce_type": b"dev.mayfly.task.requested",
        "ce_knativearrivaltime": b"2025-03-14T09:26:53Z",  # unknown extensions are ignored
    }

    request = from_kafka(headers, None, b'{"task": "reboot", "devices": ["dev-9"]}')

    assert isinstance(request, TaskRequest)
    assert request.priority is Priority.NORMAL
    assert request.channel == "stable"
    assert request.partition_key == "dev-9"
    assert request.params == {}
    assert request.traceparent is None


def test_kafka_record_key_is_the_partition_key_when_the_attribute_is_absent() -> None:
    headers = {
        "ce_specversion": b"1.0",
        "ce_id": b"req-1",
        "ce_source": b"/x",
        "ce_type": b"dev.mayfly.task.requested",
    }

    request = from_kafka(headers, b"lane-7", b'{"task": "reboot", "devices": ["a", "b"]}')

    assert isinstance(request, TaskRequest)
    assert request.partition_key == "lane-7"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
    ],
)
def test_json_content_types_are_accepted(content_type: str | None) -> None:
    headers, key, value = kafka_golden()
    del headers["content-type"]
    if content_type is not None:
        headers["content-type"] = content_type.encode()

    assert from_kafka(headers, key, value) == golden_single_device_request()


def test_structured_event_with_base64_data_decodes() -> None:
    envelope = load("requested.json")
    data = json.dumps(envelope.pop("data")).encode()
    envelope["data_base64"] = __import__("base64").b64encode(data).decode()

    assert from_http({}, json.dumps(envelope)) == golden_request()


# --- bad input ----------------------------------------------------------------


def binary(
    drop: str = "", value: bytes | None = None, content_type: str | None = None, **changes: str
) -> Any:
    """The golden Kafka record with a header dropped or changed, decoded."""
    headers, key, original = kafka_golden()
    headers.pop(drop, None)
    if content_type is not None:
        headers["content-type"] = content_type.encode()
    for name, text in changes.items():
        headers[name] = text.encode()
    return from_kafka(headers, key, original if value is None else value)


def structured(edit: Callable[[dict[str, Any]], object]) -> Any:
    """The golden structured request, edited, decoded over HTTP."""
    envelope = load("requested.json")
    edit(envelope)
    return from_http({"content-type": STRUCTURED_CONTENT_TYPE}, json.dumps(envelope))


def golden_value() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(kafka_golden()[2])
    return value


def with_data(**changes: Any) -> bytes:
    data = golden_value()
    data.update(changes)
    return json.dumps(data).encode()


BAD_INPUT: list[tuple[str, Callable[[], object], str]] = [
    ("missing id", lambda: binary("ce_id"), "id"),
    ("missing source", lambda: binary("ce_source"), "source"),
    ("missing type", lambda: binary("ce_type"), "type"),
    ("missing specversion", lambda: binary("ce_specversion"), "specversion"),
    ("structured missing id", lambda: structured(lambda e: e.pop("id")), "id"),
    ("structured missing source", lambda: structured(lambda e: e.pop("source")), "source"),
    ("structured missing type", lambda: structured(lambda e: e.pop("type")), "type"),
    (
        "structured missing specversion",
        lambda: structured(lambda e: e.pop("specversion")),
        "specversion",
    ),
    ("mistyped id", lambda: structured(lambda e: e.update(id=42)), "id"),
    ("mistyped time", lambda: structured(lambda e: e.update(time="yesterday")), "time"),
    ("mistyped priority", lambda: structured(lambda e: e.update(priority=1)), "priority"),
    ("id with spaces", lambda: binary(ce_id="not an id"), "id"),
    ("unknown priority", lambda: binary(ce_priority="urgent"), "priority"),
    ("wrong specversion", lambda: binary(ce_specversion="0.3"), "specversion"),
    ("unknown type", lambda: binary(ce_type="dev.mayfly.task.exploded"), "type"),
    ("tasktype mismatch", lambda: binary(ce_tasktype="factory-reset"), "tasktype"),
    ("text/plain data", lambda: binary(content_type="text/plain"), "datacontenttype"),
    (
        "latin-1 charset",
        lambda: binary(content_type="application/json; charset=latin-1"),
        "datacontenttype",
    ),
    (
        "structured xml data",
        lambda: structured(lambda e: e.update(datacontenttype="application/xml")),
        "datacontenttype",
    ),
    (
        "batched mode",
        lambda: from_http({"content-type": "application/cloudevents-batch+json"}, b"[]"),
        "datacontenttype",
    ),
    ("malformed JSON data", lambda: binary(value=b'{"task": "reboot",'), "data"),
    (
        "malformed structured JSON",
        lambda: from_http({"content-type": STRUCTURED_CONTENT_TYPE}, b'{"specversion": '),
        "data",
    ),
    (
        "NaN is not JSON",
        lambda: binary(value=b'{"task": "reboot", "devices": ["a"], "params": {"x": NaN}}'),
        "data",
    ),
    ("data not an object", lambda: binary(value=b'["reboot"]'), "data"),
    (
        "double-encoded data",
        lambda: structured(lambda e: e.update(data=json.dumps(e["data"]))),
        "data",
    ),
    ("no data", lambda: binary(value=b""), "data"),
    ("data over the size limit", lambda: binary(value=b" " * (MAX_EVENT_BYTES + 1)), "data"),
    ("bad base64", lambda: structured(lambda e: e.update(data=None, data_base64="%%%")), "data"),
    ("empty device list", lambda: binary(value=with_data(devices=[])), "data.devices"),
    (
        "device list not a list",
        lambda: binary(value=with_data(devices="sensor-0001")),
        "data.devices",
    ),
    ("duplicate device", lambda: binary(value=with_data(devices=["a", "a"])), "data.devices.1"),
    (
        "bad task name",
        lambda: binary(value=with_data(task="Reboot!"), ce_tasktype="Reboot!"),
        "data.task",
    ),
    ("bad version", lambda: binary(value=with_data(version="2.4", channel=None)), "data.version"),
    ("version and channel", lambda: binary(value=with_data(version="2.4.1")), "data.version"),
    (
        "naive deadline",
        lambda: binary(value=with_data(deadline="2025-03-14T10:00:00")),
        "data.deadline",
    ),
    (
        "rollout max_parallel 0",
        lambda: binary(value=with_data(rollout={"max_parallel": 0})),
        "data.rollout.max_parallel",
    ),
    (
        "rollout ratio above 1",
        lambda: binary(value=with_data(rollout={"max_failure_ratio": 2})),
        "data.rollout.max_failure_ratio",
    ),
    ("unknown data field", lambda: binary(value=with_data(dedline="tomorrow")), "data.dedline"),
    (
        "attribute smuggled into data",
        lambda: binary(value=with_data(priority="high")),
        "data.priority",
    ),
    (
        "non-UTF-8 header",
        lambda: from_kafka({"ce_specversion": b"1.0", "ce_id": b"\xff"}, None, b"{}"),
        "id",
    ),
    (
        "non-UTF-8 key",
        lambda: from_kafka(dict(kafka_golden()[0]), b"\xff", kafka_golden()[2]),
        "partitionkey",
    ),
    ("not a CloudEvent: plain bytes", lambda: from_kafka({}, b"k", b"hello"), "specversion"),
    (
        "not a CloudEvent: unrelated headers",
        lambda: from_kafka([("trace", b"x")], None, b"\x00\x01"),
        "specversion",
    ),
    (
        "not a CloudEvent: plain JSON",
        lambda: from_http({"content-type": "application/json"}, b'{"task": "x"}'),
        "specversion",
    ),
    ("not a CloudEvent: JSON array", lambda: from_http({}, b"[1, 2]"), "specversion"),
    ("not a CloudEvent: empty record", lambda: from_kafka(None, None, None), "specversion"),
]


@pytest.mark.parametrize(("case", "decode", "field"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_event_error_naming_the_field(
    case: str, decode: Callable[[], object], field: str
) -> None:
    with pytest.raises(EventError) as caught:
        decode()

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_unknown_priority_message_lists_the_allowed_values() -> None:
    with pytest.raises(EventError, match=r"'high', 'normal' or 'low'.*'urgent'"):
        binary(ce_priority="urgent")


def test_non_cloudevent_message_says_so() -> None:
    with pytest.raises(EventError, match="not a CloudEvent"):
        from_kafka({}, None, b"hello")


def test_completed_event_with_wrong_id_is_refused() -> None:
    headers, body = to_http(golden_completed())
    headers["ce-id"] = "something-else"

    with pytest.raises(EventError) as caught:
        from_http(headers, body)

    assert caught.value.field == "id"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("package", "digest"), "md5:abc", "data.package.digest"),
        (("package", "name"), "other-task", "data.package.name"),
        (("devices", 1, "status"), "exploded", "data.devices.1.status"),
        (("devices", 0, "attempts"), -1, "data.devices.0.attempts"),
        (("part", "index"), 3, "data.part.index"),
        (("coordinator", "pid"), "1", "data.coordinator.pid"),
    ],
)
def test_bad_completed_data_names_the_nested_field(
    path: tuple[str | int, ...], value: object, field: str
) -> None:
    headers, body = to_http(golden_completed())
    data = json.loads(body)
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value

    with pytest.raises(EventError) as caught:
        from_http(headers, json.dumps(data))

    assert caught.value.field == field


def test_results_from_newer_versions_are_read_tolerantly() -> None:
    headers, body = to_http(golden_completed())
    data = json.loads(body)
    data["new_field"] = 1
    data["devices"][0]["energy_mj"] = 12

    assert from_http(headers, json.dumps(data)) == golden_completed()


def test_encoding_refuses_data_over_the_limit() -> None:
    huge = completed((device_result("d1", "x" * MAX_EVENT_BYTES),))

    for encode in (to_kafka, to_http):
        with pytest.raises(EventError, match="split_completed") as caught:
            encode(huge)
        assert caught.value.field == "data"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"devices": ()}, "data.devices"),
        ({"devices": ["a"], "priority": "urgent"}, "priority"),
        ({"devices": ["a"], "rollout": {"max_parallel": 0}}, "data.rollout.max_parallel"),
        ({"devices": ["a"], "params": {"when": datetime.now}}, "data.params.when"),
        ({"devices": ["a"], "deadline": datetime(2025, 1, 1)}, "data.deadline"),
        ({"devices": ["a"], "traceparent": "garbage"}, "traceparent"),
        ({"devices": ["a"], "version": "1.0.0", "channel": "canary"}, "data.version"),
    ],
)
def test_new_request_validates_arguments(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(EventError) as caught:
        new_request("reboot", **arguments)

    assert caught.value.field == field
    assert isinstance(caught.value.__cause__, ValidationError)


def test_new_request_fills_id_time_and_channel() -> None:
    before = datetime.now(UTC)

    request = new_request("reboot", devices=["a"], selector={"site": "lyon"})

    assert len(request.id) == 36
    assert before <= request.time <= datetime.now(UTC)
    assert request.channel == "stable"
    assert new_request("reboot", devices=["a"], version="1.2.3").channel is None
    assert new_request("reboot", devices=["a"]).id != request.id


def test_models_are_frozen() -> None:
    request = golden_request()

    with pytest.raises(ValidationError):
        request.task = "other"  # type: ignore[misc]


# --- partition keys ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "selector", "explicit", "expected"),
    [
        (["dev-1"], None, None, "dev-1"),
        (["dev-1"], {}, None, "dev-1"),
        (["dev-1", "dev-2"], None, None, "req-1"),
        ([], {"site": "lyon"}, None, "req-1"),
        (["dev-1"], {"site": "lyon"}, None, "req-1"),
        (["dev-1"], None, "tenant-a", "tenant-a"),
        (["dev-1", "dev-2"], None, "tenant-a", "tenant-a"),
    ],
)
def test_partition_key_rules(
    devices: list[str], selector: dict[str, str] | None, explicit: str | None, expected: str
) -> None:
    assert partition_key_for("req-1", devices, selector, explicit=explicit) == expected

    request = new_request(
        "reboot",
        devices=devices,
        selector=selector or ({} if devices else {"site": "x"}),
        request_id="req-1",
        partition_key=explicit,
    )
    assert request.partition_key == expected
    assert to_kafka(request).key == expected.encode()


def test_one_device_keeps_its_requests_on_one_key() -> None:
    keys = {to_kafka(new_request("reboot", devices=["dev-1"])).key for _ in range(5)}

    assert keys == {b"dev-1"}


# --- split results ------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_result() -> TaskCompleted:
    rng = random.Random(7)
    devices = tuple(
        device_result(
            f"sensor-{i:05d}",
            {"log": "".join(rng.choices("abcdef0123456789", k=rng.randint(100, 400))), "n": i},
        )
        for i in range(20_000)
    )
    return completed(devices)


def test_split_keeps_every_kafka_record_under_one_mebibyte(big_result: TaskCompleted) -> None:
    assert len(big_result.data_json()) > 3 * KAFKA_LIMIT  # the test is meaningful

    parts = split_completed(big_result)

    assert len(parts) > 3
    assert [p.part for p in parts] == [Part(index=i, count=len(parts)) for i in range(len(parts))]
    for part in parts:
        assert len(part.data_json()) <= 900_000
        assert part.id == f"{REQUEST_ID}:completed:{part.part.index}"
        for mode in ("binary", "structured"):
            message = to_kafka(part, mode)
            size = len(message.value) + len(message.key or b"")
            size += sum(len(k) + len(v) for k, v in message.headers.items())
            assert size < KAFKA_LIMIT
            assert message.key == REQUEST_ID.encode()


def test_merge_gives_back_the_split_result(big_result: TaskCompleted) -> None:
    parts = list(split_completed(big_result))
    received = []
    for part in parts:
        decoded = from_kafka(to_kafka(part))
        assert isinstance(decoded, TaskCompleted)
        received.append(decoded)
    random.Random(3).shuffle(received)

    merged = merge_completed([*received, received[0]])  # a redelivered duplicate

    assert merged == big_result


def test_small_result_is_one_part() -> None:
    result = golden_completed()

    assert split_completed(result) == (result,)
    assert merge_completed([result]) == result


def test_split_honours_a_custom_budget() -> None:
    result = completed(tuple(device_result(f"d{i}", "x" * 200) for i in range(50)))

    parts = split_completed(result, max_event_bytes=2_000)

    assert all(len(p.data_json()) <= 2_000 for p in parts)
    assert merge_completed(parts) == result


def test_split_refuses_a_device_result_that_alone_is_too_big() -> None:
    result = completed((device_result("d0"), device_result("d1", "x" * 5_000)))

    with pytest.raises(EventError) as caught:
        split_completed(result, max_event_bytes=2_000)

    assert caught.value.field == "data.devices.1"


def test_merge_refuses_missing_parts(big_result: TaskCompleted) -> None:
    parts = split_completed(big_result)

    with pytest.raises(EventError, match=r"missing part\(s\) \[1\]") as caught:
        merge_completed([parts[0], *parts[2:]])

    assert caught.value.field == "data.part"


def test_merge_refuses_parts_of_different_requests(big_result: TaskCompleted) -> None:
    parts = split_completed(big_result)
    stranger = parts[1].model_copy(update={"request_id": "another-request"})

    with pytest.raises(EventError) as caught:
        merge_completed([parts[0], stranger, *parts[2:]])

    assert caught.value.field == "data.request_id"


def test_merge_refuses_parts_that_disagree(big_result: TaskCompleted) -> None:
    parts = split_completed(big_result)
    odd = parts[1].model_copy(update={"status": OverallStatus.FAILED})

    with pytest.raises(EventError) as caught:
        merge_completed([parts[0], odd, *parts[2:]])

    assert caught.value.field == "data.status"


def test_merge_refuses_nothing() -> None:
    with pytest.raises(EventError):
        merge_completed([])


# --- rejections -----------------------------------------------------------------------


def test_rejection_of_a_non_cloudevent() -> None:
    with pytest.raises(EventError) as caught:
        from_kafka([("x", b"y")], None, b"hello")

    rejected = rejection_for(caught.value, peek_attributes([("x", b"y")], b"hello"))

    assert rejected.code is RejectionCode.NOT_A_CLOUDEVENT
    assert rejected.request_id is None
    assert rejected.field == "specversion"
    assert rejected.original == {}
    assert from_kafka(to_kafka(rejected)) == rejected


def test_rejection_of_an_invalid_request_carries_its_identity_and_trace() -> None:
    headers, key, _ = kafka_golden()
    headers["ce_priority"] = b"urgent"
    record = ce_kafka.KafkaMessage(headers, key, kafka_golden()[2])
    with pytest.raises(EventError) as caught:
        from_kafka(record)

    rejected = rejection_for(caught.value, peek_attributes(record))

    assert rejected.code is RejectionCode.INVALID_EVENT
    assert rejected.field == "priority"
    assert rejected.request_id == "7d1e0c55-0b8e-4a8f-a3c9-5d2b9f6e4c10"
    assert rejected.id == "7d1e0c55-0b8e-4a8f-a3c9-5d2b9f6e4c10:rejected"
    assert rejected.traceparent == TRACEPARENT
    assert rejected.priority is Priority.NORMAL  # the original's was not valid
    assert rejected.original["priority"] == "urgent"
    assert rejected.tasktype == "reboot"
    assert "priority" in rejected.reason


def test_rejection_codes_follow_the_error() -> None:
    attributes = golden_request().cloudevent_attributes()

    def code(error: BaseException) -> RejectionCode:
        return rejection_for(error, attributes).code

    assert code(EventError("data.params.retries", "must be an integer")) == "invalid_params"
    assert code(EventError("specversion", "'0.3' is not supported")) == "invalid_event"
    assert (
        code(PackageNotFoundError("no such package", package="firmware-update")) == "unknown_task"
    )
    assert code(IntegrityError("signature does not verify", package="x")) == "integrity"
    assert code(RuntimeError("boom")) == "internal"
    unknown = rejection_for(
        EventError("data.devices.0", "unknown device"),
        attributes,
        code=RejectionCode.UNKNOWN_DEVICE,
    )
    assert unknown.code == "unknown_device"


def test_rejection_caps_what_it_copies_from_hostile_input() -> None:
    attributes = {"specversion": "1.0", "id": "x" * 5_000, "source": "y" * 5_000, "type": 3}

    rejected = rejection_for(EventError("id", "too long"), attributes)

    assert rejected.original["source"] == "y" * 1024
    assert rejected.original["type"] == "3"
    assert len(rejected.id) == 36  # the id was unusable: a fresh one
    assert from_http(*to_http(rejected)) == rejected


def test_rejection_drops_an_invalid_traceparent() -> None:
    rejected = rejection_for(ValueError("x"), {"id": "r1", "traceparent": "bogus"})

    assert rejected.traceparent is None
    assert rejected.reason == "internal error: ValueError: x"


def test_peek_attributes_reads_structured_and_binary_messages() -> None:
    body = (DATA / "requested.json").read_bytes()
    headers, _, value = kafka_golden()

    structured_attributes = peek_attributes({"content-type": STRUCTURED_CONTENT_TYPE}, body)
    binary_attributes = peek_attributes(list(headers.items()), value)

    assert structured_attributes["id"] == REQUEST_ID
    assert "data" not in structured_attributes
    assert binary_attributes["id"] == "7d1e0c55-0b8e-4a8f-a3c9-5d2b9f6e4c10"
    assert binary_attributes["datacontenttype"] == "application/json"
    assert peek_attributes({"ce-id": "h1"}) == {"id": "h1"}
    assert peek_attributes(None, b"\xff\xfe garbage") == {}


def test_cloudevent_with_raw_json_bytes_decodes() -> None:
    model = golden_request()
    event = CloudEvent(model.cloudevent_attributes(), model.data_json())

    assert from_cloudevent(event) == model


@pytest.mark.parametrize(
    "parent",
    [
        "00-abc-def-01",
        f"00-{'0' * 32}-{'1' * 16}-01",  # all-zero trace id
        TRACEPARENT.upper(),  # W3C: lowercase hex only
        "garbage\x7f",
    ],
)
def test_a_bad_trace_context_starts_a_new_trace_and_never_rejects_the_request(
    parent: str, caplog: pytest.LogCaptureFixture
) -> None:
    request = binary(ce_traceparent=parent, ce_tracestate=TRACESTATE)
    assert isinstance(request, TaskRequest)
    assert (request.traceparent, request.tracestate) == (None, None)
    assert "starts a new trace" in caplog.text
    over_http = from_http(
        {**dict(to_http(request)[0]), "ce-traceparent": parent}, to_http(request)[1]
    )
    assert over_http.traceparent is None


def test_the_w3c_traceparent_header_is_the_trace_context_when_the_event_carries_none() -> None:
    headers, key, value = kafka_golden()
    for name in ("ce_traceparent", "ce_tracestate"):
        headers.pop(name, None)
    headers |= {"traceparent": TRACEPARENT.encode(), "tracestate": TRACESTATE.encode()}
    request = from_kafka(headers, key, value)
    assert (request.traceparent, request.tracestate) == (TRACEPARENT, TRACESTATE)
    # The CloudEvent's own attribute wins over a header an instrumentation set.
    other = f"00-{'a' * 32}-{'b' * 16}-01"
    headers |= {"ce_traceparent": other.encode()}
    assert from_kafka(headers, key, value).traceparent == other
    http_headers, body = to_http(request)
    http_headers = {
        k: v for k, v in http_headers.items() if k not in ("ce-traceparent", "ce-tracestate")
    }
    assert from_http({**http_headers, "traceparent": TRACEPARENT}, body).traceparent == TRACEPARENT


def test_a_bad_tracestate_is_dropped_and_the_trace_kept() -> None:
    request = binary(ce_traceparent=TRACEPARENT, ce_tracestate=" leading space")
    assert (request.traceparent, request.tracestate) == (TRACEPARENT, None)


def test_a_request_is_cut_into_even_shards_that_split_its_rollout() -> None:
    request = new_request(
        "reboot",
        selector={"site": "lab"},
        rollout={"max_parallel": 7, "max_failure_ratio": 0.2},
        channel="canary",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    devices = [f"sim-{i:04d}" for i in range(23)]
    shards = shard_request(request, devices, 5, version="1.4.0")

    assert [len(s.devices) for s in shards] == [5, 5, 5, 4, 4]
    assert [d for s in shards for d in s.devices] == devices
    assert [s.rollout.max_parallel for s in shards if s.rollout] == [2, 2, 1, 1, 1]
    assert {s.rollout.max_failure_ratio for s in shards if s.rollout} == {0.2}
    for index, shard in enumerate(shards):
        assert shard.id == shard.partition_key == f"{request.id}#shard-{index}"
        assert shard.shard == Shard(of=request.id, index=index, count=5)
        assert shard.root_id == request.id
        assert (shard.version, shard.channel, shard.selector) == ("1.4.0", None, {})
        assert (shard.source, shard.time, shard.traceparent) == (
            request.source,
            request.time,
            request.traceparent,
        )
        # On the wire and back, a shard is a request like any other.
        assert from_kafka(*_swap(to_kafka_record(shard))) == shard


def _swap(record: tuple[bytes | None, bytes, list[tuple[str, bytes]]]) -> tuple[Any, ...]:
    key, value, headers = record
    return headers, key, value


def test_shards_are_no_more_than_the_rollout_runs_at_once() -> None:
    request = new_request("reboot", selector={"site": "lab"}, rollout={"max_parallel": 2})
    shards = shard_request(request, [f"d{i}" for i in range(100)], 10, version="1.0.0")
    assert [len(s.devices) for s in shards] == [50, 50]
    assert [s.rollout.max_parallel for s in shards if s.rollout] == [1, 1]
    # Small enough, or a shard already: not cut.
    assert shard_request(request, ["d1"], 10, version="1.0.0") == (request,)
    assert shard_request(shards[0], [f"d{i}" for i in range(50)], 10, version="1.0.0") == (
        shards[0],
    )


def test_a_long_request_id_still_makes_valid_shard_ids() -> None:
    request = new_request("reboot", selector={"site": "lab"}, request_id="x" * 256)
    shards = shard_request(request, ["a", "b"], 1, version="1.0.0")
    assert [len(s.id) <= 256 for s in shards] == [True, True]
    assert len({s.id for s in shards}) == 2
    assert {s.root_id for s in shards} == {"x" * 256}


@pytest.mark.parametrize(
    ("selector", "shard", "field"),
    [
        ({"site": "lab"}, {"of": "r", "index": 0, "count": 2}, "data.shard"),
        ({}, {"of": "r", "index": 2, "count": 2}, "data.shard.index"),
        ({}, {"of": "r", "index": 0, "count": 1}, "data.shard.count"),
    ],
)
def test_a_shard_names_its_devices_and_its_place(
    selector: dict[str, str], shard: dict[str, Any], field: str
) -> None:
    values = {"task": "reboot", "devices": ["d1"], "selector": selector}
    values["id"] = f"r#shard-{shard['index']}"
    with pytest.raises(EventError) as caught:
        validate_model(TaskRequest, {**values, "shard": shard})
    assert caught.value.field == field


def test_a_request_without_shards_encodes_as_before() -> None:
    request = new_request("reboot", devices=["d1"], rollout={"max_parallel": 2})
    data = json.loads(request.data_json())
    assert "shard" not in data
    assert data["rollout"] == {"max_parallel": 2, "max_failure_ratio": None}


def test_long_device_ids_make_more_shards_so_each_is_one_event() -> None:
    request = new_request("reboot", selector={"site": "lab"}, rollout={"max_parallel": 2})
    devices = [f"{i:06d}-" + "x" * 114 for i in range(20_000)]  # 120 characters each
    shards = shard_request(request, devices, 10_000, version="1.0.0")
    assert len(shards) == 5  # by size, past both the shard size and max_parallel
    assert [d for s in shards for d in s.devices] == devices
    assert all(len(to_kafka_record(s)[1]) < MAX_EVENT_BYTES for s in shards)
    assert all(s.rollout and s.rollout.max_parallel == 1 for s in shards)


def test_a_shard_s_id_is_its_place_and_the_mark_is_kept_for_shards() -> None:
    shard = {"of": "r", "index": 1, "count": 2}
    values = {"task": "reboot", "devices": ["d1"], "partition_key": "k"}
    with pytest.raises(EventError) as forged:
        validate_model(TaskRequest, {**values, "id": "r#shard-0", "shard": shard})
    assert forged.value.field == "id"
    with pytest.raises(EventError) as posing:
        validate_model(TaskRequest, {**values, "id": "r#shard-1"})
    assert posing.value.field == "id"
    assert validate_model(TaskRequest, {**values, "id": "r#shard-1", "shard": shard}).shard


# --- cancels ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"request_id": "a b"}, "data.request_id"),
        ({"request_id": "r", "grace_s": -1}, "data.grace_s"),
        ({"request_id": "r", "grace_s": 3601}, "data.grace_s"),
        ({"request_id": "r", "grace_s": float("nan")}, "data.grace_s"),
        ({"request_id": "r", "reason": "x" * 201}, "data.reason"),
        ({"request_id": "r", "colour": "red"}, "data.colour"),
    ],
)
def test_a_cancel_out_of_bounds_is_refused_naming_its_field(
    values: dict[str, Any], field: str
) -> None:
    cancel = TaskCancel(request_id="r")
    attributes = cancel.cloudevent_attributes()
    with pytest.raises(EventError) as caught:
        TaskCancel.from_parts(attributes, values)
    assert caught.value.field == field


def test_a_cancel_travels_on_its_requests_partition_key() -> None:
    cancel = TaskCancel(request_id=REQUEST_ID)
    key, value, headers = to_kafka_record(cancel)
    assert key == REQUEST_ID.encode()
    assert from_kafka(headers, key, value) == cancel
    assert cancel.grace_s == 10.0


def test_a_rollout_with_abort_criteria_and_a_rollback_round_trips() -> None:
    request = new_request(
        "config-push",
        devices=["a", "b"],
        params={"config": {"telemetry_interval_s": 99}},
        rollout={
            "abort": {"outcome": "timed_out", "threshold_pct": 12.5, "min_devices": 40},
            "on_abort": {"task": "config-push", "version": "1.0.0", "params": {"mode": "merge"}},
        },
    )
    key, value, headers = to_kafka_record(request)
    decoded = from_kafka(headers, key, value)
    assert decoded == request
    assert isinstance(decoded, TaskRequest)
    assert decoded.rollout is not None
    assert decoded.rollout.abort is not None
    assert decoded.rollout.abort.threshold_pct == 12.5
    assert json.loads(value)["rollout"]["on_abort"] == {
        "task": "config-push",
        "version": "1.0.0",
        "params": {"mode": "merge"},
    }
    # A rollout without them says nothing of them on the wire.
    plain = new_request("reboot", devices=["a"], rollout={"max_parallel": 2})
    assert json.loads(to_kafka_record(plain)[1])["rollout"] == {
        "max_parallel": 2,
        "max_failure_ratio": None,
    }


def test_a_rollback_over_many_long_device_ids_is_cut_into_requests_that_each_fit() -> None:
    from mayfly.events import Rollback, rollback_requests

    rollout = new_request("config-push", devices=["a"], params={"config": {"x": 1}})
    devices = [f"{i:05d}-" + "d" * 240 for i in range(6_000)]  # about 1.5 MB of ids
    undo = rollback_requests(rollout, Rollback(task="config-push"), devices)

    assert len(undo) == 3
    assert [d for one in undo for d in one.devices] == devices
    for one in undo:
        to_kafka_record(one)  # each is one event, under the size limit
    again = rollback_requests(rollout, Rollback(task="config-push"), devices)
    assert [one.id for one in again] == [one.id for one in undo]
    assert len({one.id for one in undo}) == 3


def test_a_paced_rollout_and_a_checkpoint_round_trip() -> None:
    request = new_request(
        "config-push",
        devices=["a", "b"],
        rollout={
            "waves": [50, "12.5%"],
            "ramp": {"base_per_minute": 30, "increase_after": 20, "max_per_minute": 600},
        },
    )
    key, value, headers = to_kafka_record(request)
    decoded = from_kafka(headers, key, value)
    assert decoded == request
    assert json.loads(value)["rollout"]["waves"] == [50, "12.5%"]
    assert json.loads(value)["rollout"]["ramp"] == {
        "base_per_minute": 30.0,
        "increment_factor": 2.0,
        "increase_after": 20,
        "max_per_minute": 600.0,
    }
    progress = golden_progress().model_copy(
        update={"ended": (device_result("sensor-0001", {"ok": True}),)}
    )
    key, value, headers = to_kafka_record(progress)
    back = from_kafka(headers, key, value)
    assert isinstance(back, TaskProgress)
    assert back.ended == progress.ended
    # An unpaced progress event says nothing of a checkpoint on the wire.
    assert "ended" not in json.loads(to_kafka_record(golden_progress())[1])
