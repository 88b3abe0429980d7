"""`mayfly report` as a user runs it: tables, JSON, plots, and an empty archive."""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mayfly.aggregator import LocalResultArchive
from mayfly.cli import cli

from .conftest import T0, device, rejection, result

Run = Callable[..., Result]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def mayfly(home: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> Result:
        outcome = runner.invoke(cli, ["report", *args], catch_exceptions=False)
        assert outcome.exit_code == code, outcome.output
        assert "Traceback" not in outcome.output
        return outcome

    return run


@pytest.fixture
def archived(home: Path) -> LocalResultArchive:
    archive = LocalResultArchive(home / "archive")
    events = []
    for i in range(12):
        at = T0 + timedelta(minutes=5 * i)
        flaky = device(
            "sim-0042",
            "timed_out" if i % 3 == 0 else "succeeded",
            seconds=4.0,
            error="no answer within 3s" if i % 3 == 0 else None,
            at=at,
        )
        events.append(result(f"r{i}", at=at, devices=[device("sim-0001", at=at), flaky]))
    events.append(
        result("f1", task="firmware-update", at=T0, duration=40, devices=[device("sim-0001")])
    )
    events.append(rejection("bad-1", at=T0 + timedelta(minutes=3)))
    archive.append(events)
    return archive


def _row(output: str, first_cell: str) -> list[str]:
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@pytest.mark.usefixtures("archived")
def test_tables_show_task_types_and_the_worst_devices_first(mayfly: Run) -> None:
    out = mayfly().output
    assert "13 result(s), 1 rejection(s)" in out
    assert _row(out, "reboot")[1:5] == ["12", "0", "66.7%", "24"]
    assert _row(out, "firmware-update")[1:4] == ["1", "0", "100.0%"]
    assert _row(out, "firmware-updater")[1:3] == ["1", "1"]  # the rejected request
    lines = out.splitlines()
    devices_at = next(i for i, line in enumerate(lines) if line.startswith("DEVICES"))
    assert lines[devices_at + 1].split()[0] == "DEVICE"
    assert lines[devices_at + 2].split()[0] == "sim-0042"  # the failing one first
    assert "timed_out 4" in lines[devices_at + 2]
    assert "no answer within 3s" in lines[devices_at + 2]
    assert _row(out, "sim-0001")[1:3] == ["13", "100.0%"]


@pytest.mark.usefixtures("archived")
def test_filters_and_top(mayfly: Run) -> None:
    out = mayfly("--task", "firmware-update", "--top", "1").output
    assert "firmware-update" in out
    assert not re.search(r"^reboot\b", out, re.MULTILINE)
    assert "worst 1 of 1" in out
    late = mayfly("--since", "2025-03-14T09:30", "--until", "2025-03-14T10:00").output
    assert _row(late, "reboot")[1] == "6"  # r6..r11 end after 09:30; r5 ends 09:28


@pytest.mark.usefixtures("archived")
def test_json_is_machine_readable(mayfly: Run) -> None:
    data = json.loads(mayfly("--json").output)
    assert [t["task"] for t in data["tasks"]] == ["firmware-update", "firmware-updater", "reboot"]
    assert data["devices"][0]["device_id"] == "sim-0042"
    assert data["devices"][0]["by_status"] == {"timed_out": 4}


@pytest.mark.usefixtures("archived")
def test_plot_png(mayfly: Run, tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    out = mayfly("--plot", str(target)).output
    assert f"wrote {target}" in out
    assert target.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.usefixtures("archived")
def test_plot_html_embeds_the_png_and_the_tables(mayfly: Run, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    mayfly("--plot", str(target), "--bucket", "15m")
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>")
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match is not None
    assert base64.b64decode(match[1]).startswith(PNG_SIGNATURE)
    assert "<td>sim-0042</td>" in page
    assert "<td>firmware-update</td>" in page


@pytest.mark.usefixtures("archived")
def test_plot_without_matplotlib_says_how_to_get_it(
    mayfly: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # matplotlib is the optional `plot` extra, left out of the functions image.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    out = mayfly("--plot", str(tmp_path / "out.png"), code=1).output
    assert "--plot needs matplotlib, which is not installed" in out
    assert "pip install 'mayfly[plot]'" in out
    assert not (tmp_path / "out.png").exists()


def test_an_empty_archive_says_what_to_do(mayfly: Run, home: Path) -> None:
    out = mayfly(code=1).output
    assert f"no archived results in {home / 'archive'}" in out
    assert "run `make demo` or `mayfly up`" in out
    LocalResultArchive(home / "archive").append([result()])
    filtered = mayfly("--task", "nope", code=1).output
    assert "matching --task nope" in filtered


def test_usage_mistakes_exit_2(mayfly: Run, tmp_path: Path) -> None:
    assert "neither a duration" in mayfly("--since", "yesterday", code=2).output
    assert ".png or .html" in mayfly("--plot", str(tmp_path / "x.pdf"), code=2).output


def test_html_shows_a_long_error_whole_and_the_terminal_clips_it(
    home: Path, mayfly: Run, tmp_path: Path
) -> None:
    error = "device sim-0007: POST /actions/firmware-install: 409 Conflict: 2.0.0 is not staged"
    archive = LocalResultArchive(home / "archive")
    archive.append([result("r1", devices=[device("sim-0007", "failed", error=error)])])
    target = tmp_path / "report.html"

    out = mayfly("--plot", str(target)).output
    page = target.read_text()

    assert f"<td>{error}</td>" in page
    assert error not in out
    assert error[:40] in out


def test_a_bucket_where_everything_failed_is_drawn_unlike_one_with_nothing() -> None:
    from mayfly.aggregator.insights import TimeBucket
    from mayfly.aggregator.render import ZERO_BAR, success_bars

    def bucket(requests: int, succeeded: int) -> TimeBucket:
        rate = succeeded / requests if requests else None
        return TimeBucket(T0, requests, succeeded, rate, None, None)

    heights, colours = success_bars([bucket(4, 2), bucket(3, 0), bucket(0, 0)])

    assert heights[:2] == [50.0, ZERO_BAR]
    assert heights[2] != heights[2]  # nan: no bar at all
    assert colours[:2] == ["tab:green", "tab:red"]
