"""`mayfly pkg new` and `mayfly pkg run`: a package from a template, run
unpublished on simulated devices through a real coordinator and sandbox,
again on every change with --watch; nothing lands in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def _mayfly(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"MAYFLY_HOME": str(tmp_path / "home")},
        timeout=120,
        check=False,
    )


def test_a_new_package_runs_on_simulated_devices_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    made = _mayfly(tmp_path, "pkg", "new", "blink-led")
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "blink-led"
    assert sorted(p.name for p in folder.iterdir()) == [
        "blink_led.py",
        "manifest.json",
        "test_blink_led.py",
    ]
    ran = _mayfly(tmp_path, "pkg", "run", "blink-led", "--sim", "3", "-p", "message=on")
    assert ran.returncode == 0, ran.stderr
    assert "blink-led 0.1.0: succeeded (3 succeeded)" in ran.stdout
    for device in ("sim-0001", "sim-0002", "sim-0003"):
        assert f"{device}" in ran.stdout
    assert '"message": "on"' in ran.stdout
    assert "runs firmware 1.0.0" in ran.stderr  # the package's ctx.log lines
    assert "imports in the sandbox" in ran.stderr
    assert not (tmp_path / "home" / "packages").exists()  # never in the store
    assert not (tmp_path / "home" / "keys").exists()  # no key of the user's needed


def test_a_failing_package_says_where_per_device(tmp_path: Path) -> None:
    assert _mayfly(tmp_path, "pkg", "new", "oops").returncode == 0
    code = tmp_path / "oops" / "oops.py"
    code.write_text(code.read_text().replace('ctx.progress(100, "done")', "1 / 0"))
    ran = _mayfly(tmp_path, "pkg", "run", "oops", "--sim", "1")
    assert ran.returncode == 4, ran.stdout + ran.stderr  # no device succeeded
    assert "error ZeroDivisionError: division by zero (at oops.py:" in ran.stdout


@pytest.mark.parametrize(("name", "said"), [("Bad_Name", "is not a package name"), ("x", "exists")])
def test_pkg_new_refuses_a_bad_name_or_an_existing_folder(
    tmp_path: Path, name: str, said: str
) -> None:
    (tmp_path / "x").mkdir()
    made = _mayfly(tmp_path, "pkg", "new", name)
    assert made.returncode != 0
    assert said in made.stderr
    assert "Traceback" not in made.stderr


def test_watch_runs_again_when_a_file_changes(tmp_path: Path) -> None:
    """Changed while its run is still going: the change is not missed, the
    next run starts once this one ends."""
    folder = tmp_path / "w"
    folder.mkdir()
    manifest = {"name": "w", "version": "0.1.0", "entrypoint": "task:run"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code = folder / "task.py"
    code.write_text("import time\n\ndef run(ctx):\n    time.sleep(2)\n    return {'run': 1}\n")
    watching = subprocess.Popen(
        [sys.executable, "-m", "mayfly", "pkg", "run", "w", "--sim", "1", "--watch"],
        cwd=tmp_path,
        env=os.environ | {"MAYFLY_HOME": str(tmp_path / "home")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []

    def pump() -> None:  # a reader of its own: a test never blocks on a line
        assert watching.stdout is not None
        for line in watching.stdout:
            seen.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 90

    def read_until(text: str) -> None:
        while not any(text in line for line in list(seen)):
            assert time.monotonic() < deadline, "".join(seen)
            time.sleep(0.05)

    try:
        read_until("imports in the sandbox")  # checked: its device runs for 2 s now
        code.write_text("def run(ctx):\n    return {'run': 2}\n")
        read_until('output {"run": 1}')
        read_until('output {"run": 2}')
    finally:
        watching.terminate()
        watching.wait(timeout=30)
        reader.join(timeout=10)
        assert watching.stdout is not None
        watching.stdout.close()


def test_a_package_for_a_new_action_runs_on_a_simulator_that_declares_it(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "blinker"
    folder.mkdir()
    manifest = {
        "name": "blinker",
        "version": "0.1.0",
        "entrypoint": "task:run",
        "capabilities": ["led"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "task.py").write_text(
        "def run(ctx):\n    return ctx.device.action('blink', {'times': 2})\n"
    )
    template = '{"blinked": "$payload", "by": "{device_id}"}'
    ran = _mayfly(
        tmp_path,
        "pkg",
        "run",
        "blinker",
        "--sim",
        "2",
        "--action",
        f"blink={template}",
        "--capability",
        "led",
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert '{"blinked": {"times": 2}, "by": "sim-0002"}' in ran.stdout
    # Without the capability no device matches what the package needs.
    bare = _mayfly(tmp_path, "pkg", "run", "blinker", "--sim", "1", "--action", "blink")
    assert bare.returncode != 0
    assert "led" in bare.stdout + bare.stderr
