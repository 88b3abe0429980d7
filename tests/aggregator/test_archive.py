"""Result archives: a folder of daily JSON-lines files, and a bucket (S3)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from mayfly.aggregator import (
    BucketResultArchive,
    LocalResultArchive,
    ResultArchive,
    decode_archived,
    encode_archived,
)
from mayfly.aggregator.archive import archive_key
from mayfly.app.wiring import open_archive
from mayfly.errors import ConfigError
from mayfly.events import STRUCTURED_CONTENT_TYPE, TaskCompleted, from_http
from mayfly.packages import LocalPackageStore
from mayfly.settings import Settings

from ..conftest import S3Server
from .conftest import T0, device, rejection, result

DAY = timedelta(days=1)


def _events() -> list[TaskCompleted]:
    # Three days, archived out of order: day 2, day 1, day 3, day 1 again.
    return [
        result("r-day2", at=T0 + DAY),
        result("r-day1-late", at=T0 + timedelta(hours=3), task="firmware-update"),
        result("r-day3", at=T0 + 2 * DAY),
        result("r-day1-early", at=T0),
    ]


def _check_round_trip(archive: ResultArchive) -> None:
    events = _events()
    rejected = rejection()
    archive.append(events[:2])
    archive.append([*events[2:], rejected])
    archive.append([events[0]])  # a redelivery is listed once

    read = list(archive.read())
    assert [e.request_id for e in read] == [
        "req-bad",  # ended 0.2 s after T0, before r-day1-early finished
        "r-day1-early",
        "r-day1-late",
        "r-day2",
        "r-day3",
    ]
    assert read[0] == rejected
    assert read[1] == events[3]  # every field survives

    window = list(archive.read(since=T0 + timedelta(hours=1), until=T0 + 2 * DAY))
    assert [e.request_id for e in window] == ["r-day1-late", "r-day2"]
    by_task = list(archive.read(task="firmware-update"))
    assert [e.request_id for e in by_task] == ["r-day1-late"]


def test_local_archive_round_trip_in_time_order(tmp_path: Path) -> None:
    archive = LocalResultArchive(tmp_path / "archive")
    _check_round_trip(archive)
    names = sorted(p.name for p in (tmp_path / "archive").iterdir())
    assert names[:3] == ["2025-03-14.jsonl", "2025-03-15.jsonl", "2025-03-16.jsonl"]


def test_a_line_is_a_structured_cloudevent(tmp_path: Path) -> None:
    archive = LocalResultArchive(tmp_path)
    whole = result(devices=[device("sim-0001"), device("sim-0002", "failed", error="boom")])
    archive.append([whole])
    [line] = (tmp_path / "2025-03-14.jsonl").read_bytes().splitlines()
    envelope = json.loads(line)
    assert envelope["type"] == "dev.mayfly.task.completed"
    assert envelope["id"] == "req-1:completed:0"
    assert envelope["data"]["devices"][1]["error"] == "boom"
    # The event contract's own decoder reads it back.
    assert from_http({"content-type": STRUCTURED_CONTENT_TYPE}, line) == whole
    assert decode_archived(encode_archived(whole)) == whole


def test_a_torn_last_line_is_skipped_and_later_appends_survive(tmp_path: Path) -> None:
    archive = LocalResultArchive(tmp_path)
    archive.append([result("r1"), result("r2")])
    day_file = tmp_path / "2025-03-14.jsonl"
    whole = day_file.read_bytes()
    # A crash in the middle of writing the third record.
    day_file.write_bytes(whole + encode_archived(result("r3"))[:57])
    assert [e.request_id for e in archive.read()] == ["r1", "r2"]

    archive.append([result("r4", at=T0 + timedelta(minutes=1))])
    assert [e.request_id for e in archive.read()] == ["r1", "r2", "r4"]


def test_a_record_being_written_is_read_once_whole_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = LocalResultArchive(tmp_path)
    archive.append([result("r1")])
    day_file = tmp_path / "2025-03-14.jsonl"
    line = encode_archived(result("r2")) + b"\n"
    with day_file.open("ab") as writing:  # `mayfly report` reads while the aggregator writes
        writing.write(line[:100])
        writing.flush()
        assert [e.request_id for e in archive.read()] == ["r1"]
        writing.write(line[100:])
    assert [e.request_id for e in archive.read()] == ["r1", "r2"]
    assert "unreadable" not in caplog.text


def test_a_missing_archive_reads_as_empty(tmp_path: Path) -> None:
    assert list(LocalResultArchive(tmp_path / "nothing").read()) == []


def test_bucket_archive_round_trip_on_a_folder_store(tmp_path: Path) -> None:
    archive = BucketResultArchive(LocalPackageStore(tmp_path), prefix="archive")
    _check_round_trip(archive)
    assert (tmp_path / "archive" / "2025-03-14" / "r-day1-early.json").is_file()


def test_bucket_keys_are_safe_for_any_request_id() -> None:
    plain = archive_key(result("3f2c1e9a-8d4b"))
    assert plain == "archive/2025-03-14/3f2c1e9a-8d4b.json"
    odd = archive_key(result("../etc/passwd%2F"))
    assert odd.startswith("archive/2025-03-14/sha256-")
    assert ".." not in odd
    assert archive_key(rejection()).endswith("/req-bad.rejected.json")


@pytest.mark.s3
def test_s3_archive_round_trip(s3_bucket: tuple[S3Server, str]) -> None:
    server, bucket = s3_bucket
    settings = Settings(
        home=Path("/nonexistent"),
        store="unused",
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key,
    )
    archive = open_archive(settings, f"s3://{bucket}/results")
    assert isinstance(archive, BucketResultArchive)
    _check_round_trip(archive)
    keys = [obj.object_name for obj in server.client().list_objects(bucket, recursive=True)]
    assert "results/2025-03-14/r-day1-early.json" in keys


def test_an_s3_archive_needs_s3_settings() -> None:
    with pytest.raises(ConfigError, match="MAYFLY_S3_ENDPOINT"):
        open_archive(Settings(home=Path("/h"), store="/s"), "s3://results")
    with pytest.raises(ConfigError, match="s3://BUCKET"):
        open_archive(Settings(home=Path("/h"), store="/s"), "s3://")
