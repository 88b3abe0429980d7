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
    # TASK VERSION REQUESTS OK PARTIAL FAILED CANCELED REJECTED SUCCESS DEVICES-RUN ...
    assert _row(out, "reboot")[1:11] == [
        "1.2.0", "12", "8", "4", "0", "0", "0", "66.7%", "24", "83.3%"
    ]  # fmt: skip
    assert _row(out, "firmware-update")[1:9] == ["1.2.0", "1", "1", "0", "0", "0", "0", "100.0%"]
    assert _row(out, "firmware-updater")[1:9] == ["-", "1", "0", "0", "0", "0", "1", "0.0%"]
    # The requests behind the bad numbers, and the rejections by reason.
    assert "reboot 1.2.0: partial r9, r6, r3, r0" in out
    assert "firmware-updater -: rejected bad-1" in out
    assert re.search(r"^firmware-updater\s+unknown_task\s+1\s+.*bad-1$", out, re.MULTILINE), out
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
    assert _row(late, "reboot")[2] == "6"  # r6..r11 end after 09:30; r5 ends 09:28


@pytest.mark.usefixtures("archived")
def test_json_is_machine_readable(mayfly: Run) -> None:
    data = json.loads(mayfly("--json").output)
    assert [t["task"] for t in data["tasks"]] == ["firmware-update", "firmware-updater", "reboot"]
    assert [t["version"] for t in data["tasks"]] == ["1.2.0", "-", "1.2.0"]
    assert data["tasks"][2]["problems"] == {"partial": ["r9", "r6", "r3", "r0"]}
    assert data["devices"][0]["device_id"] == "sim-0042"
    assert data["devices"][0]["by_status"] == {"timed_out": 4}
    assert data["devices"][0]["last_error_request"] == "r9"
    [reason] = data["rejection_reasons"]
    assert (reason["code"], reason["count"], reason["request_ids"]) == (
        "unknown_task",
        1,
        ["bad-1"],
    )


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
    assert '<td class="text">sim-0042</td>' in page
    assert '<td class="text">firmware-update</td><td class="text">1.2.0</td>' in page
    assert "<li>reboot 1.2.0: partial r9, r6, r3, r0</li>" in page
    assert "<h2>Rejections by reason</h2>" in page
    # Rates on the scale: 66.7 % between amber and green, 100 % green, 0 % red.
    assert '<td style="background:#1a9850">100.0%</td>' in page
    assert '<td style="background:#d73027">0.0%</td>' in page


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
    error = (
        "DeviceActionError: sim-0007: POST /actions/firmware-install: 409 Conflict:"
        " 2.0.0 is not staged"
    )
    archive = LocalResultArchive(home / "archive")
    archive.append([result("r1", devices=[device("sim-0007", "failed", error=error)])])
    target = tmp_path / "report.html"

    out = mayfly("--plot", str(target)).output
    page = target.read_text()

    assert f'<td class="text wrap">{error}</td>' in page
    assert error not in out
    assert error[:40] in out


def test_a_bucket_where_everything_failed_is_drawn_unlike_one_with_nothing() -> None:
    from mayfly.aggregator.insights import TimeBucket
    from mayfly.aggregator.render import ZERO_BAR, rate_colour, success_bars

    def bucket(requests: int, succeeded: int) -> TimeBucket:
        rate = succeeded / requests if requests else None
        return TimeBucket(T0, requests, succeeded, rate, None, None)

    heights, colours = success_bars([bucket(4, 2), bucket(3, 0), bucket(0, 0)])

    assert heights[:2] == [50.0, ZERO_BAR]
    assert heights[2] != heights[2]  # nan: no bar at all
    assert colours == [rate_colour(0.5), rate_colour(0.0), rate_colour(None)]
    assert (rate_colour(0.0), rate_colour(0.5), rate_colour(1.0)) == (
        "#d73027",
        "#fec44f",
        "#1a9850",
    )
    assert rate_colour(0.75) not in (rate_colour(0.5), rate_colour(1.0))  # a scale, not steps


def test_a_package_that_cannot_load_is_blamed_not_the_devices(home: Path, mayfly: Run) -> None:
    """Version 2.0.0 has a SyntaxError: every device fails, none of it theirs."""
    archive = LocalResultArchive(home / "archive")
    broken = "cannot load entrypoint: SyntaxError: invalid syntax (task.py, line 3)"
    events = [
        result(f"ok{i}", at=T0 + timedelta(minutes=i), devices=[device("sim-0001", at=T0)])
        for i in range(3)
    ]
    for i in range(3):
        bad = result(
            f"bad{i}",
            at=T0 + timedelta(minutes=i),
            devices=[device(d, "failed", error=broken) for d in ("sim-0001", "sim-0002")],
        )
        events.append(
            bad.model_copy(update={"package": bad.package.model_copy(update={"version": "2.0.0"})})
        )
    flaky = device("sim-0003", "failed", error="DeviceUnavailableError: sim-0003: unreachable")
    events.append(result("net", at=T0, devices=[flaky]))
    archive.append(events)

    data = json.loads(mayfly("--json").output)
    rows = {(t["task"], t["version"]): t for t in data["tasks"]}
    assert rows[("reboot", "2.0.0")]["package_errors"] == 6
    assert rows[("reboot", "2.0.0")]["failed"] == 3
    assert rows[("reboot", "2.0.0")]["problems"]["package_errors"] == ["bad2", "bad1", "bad0"]
    assert rows[("reboot", "1.2.0")]["package_errors"] == 0
    devices = {d["device_id"]: d for d in data["devices"]}
    # The unreachable device is the worst; the package's victims are not held to it.
    assert data["devices"][0]["device_id"] == "sim-0003"
    assert devices["sim-0003"]["last_error"].startswith("DeviceUnavailableError")
    assert devices["sim-0001"]["success_rate"] == 1.0  # 3 of its 3 own runs
    assert devices["sim-0001"]["package_errors"] == 3
    assert devices["sim-0001"]["last_error"] is None
    assert devices["sim-0002"]["success_rate"] is None  # it never ran a working package
    out = mayfly().output
    assert "failed 3 (3 the package's)" in _row_text(out, "sim-0001")


def _row_text(output: str, first_cell: str) -> str:
    return next(ln for ln in output.splitlines() if ln.split()[:1] == [first_cell])


def test_the_png_draws_rates_on_the_scale_and_empty_buckets_apart(
    home: Path, mayfly: Run, tmp_path: Path
) -> None:
    """Decoded, the plot shows the scale's red (a bucket where all failed), its
    green (all succeeded) and the grey tick of an empty bucket between."""
    from matplotlib.image import imread

    archive = LocalResultArchive(home / "archive")
    archive.append(
        [
            result("good", at=T0),
            result("bad", at=T0 + timedelta(minutes=10), devices=[device("sim-0001", "failed")]),
        ]
    )
    target = tmp_path / "plot.png"
    mayfly("--plot", str(target), "--bucket", "5m")
    pixels = (imread(str(target))[:, :, :3] * 255).round().astype(int)
    colours = {tuple(p) for row in pixels for p in row}

    def near(rgb: tuple[int, int, int]) -> bool:
        return any(sum(abs(a - b) for a, b in zip(c, rgb, strict=True)) <= 6 for c in colours)

    assert near((215, 48, 39))  # 0 %: the short red bar
    assert near((26, 152, 80))  # 100 %
    assert near((187, 187, 187))  # the empty bucket's tick
