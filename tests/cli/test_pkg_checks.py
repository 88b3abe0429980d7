"""`mayfly pkg build` refuses what would fail on every device, with the file
and line: a module that does not compile, an entrypoint that does not import
in the task sandbox (misspelt, raising, reaching for the network) or cannot
take the context alone, a schema default or example that does not match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


def _folder(tmp_path: Path, code: str, **manifest: object) -> Path:
    folder = tmp_path / "pkg"
    folder.mkdir(exist_ok=True)
    fields = {"name": "probe-me", "version": "1.0.0", "entrypoint": "task:run", **manifest}
    (folder / "manifest.json").write_text(json.dumps(fields))
    (folder / "task.py").write_text(code)
    return folder


def _build(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mayfly", "pkg", "build", str(folder), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={"MAYFLY_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )


def test_a_good_package_is_built_and_what_was_checked_is_said(tmp_path: Path) -> None:
    built = _build(tmp_path, TASKPKGS / "firmware-update")
    assert built.returncode == 0, built.stderr
    assert "checked  2 module(s) compile" in built.stderr
    assert "checked  params schema: 1 default(s) and 0 example(s) match it" in built.stderr
    assert "checked  entrypoint firmware_update.main:run(ctx" in built.stderr
    assert "imports in the sandbox (session" in built.stderr
    assert built.stdout.startswith("sha256:")


@pytest.mark.parametrize(
    ("code", "entrypoint", "said"),
    [
        ("def run(ctx)\n    return 1\n", "task:run", "task.py:1: SyntaxError: expected ':'"),
        ("import os\n\n\tdef run(ctx):\n  return 1\n", "task:run", "task.py:3: "),
        ("def run(ctx):\n    return 1\n", "task:rnu", "task:rnu is not a function of task"),
        ("def run(ctx):\n    return 1\n", "tsak:run", "entrypoint module 'tsak' not found"),
        (
            "import os\nx = undefined_name\ndef run(ctx):\n    return 1\n",
            "task:run",
            "NameError: name 'undefined_name' is not defined (at task.py:2)",
        ),
        (
            "import socket\nsocket.create_connection(('127.0.0.1', 9), 1)\n"
            "def run(ctx):\n    return 1\n",
            "task:run",
            "PermissionError",  # no network in the sandbox, at import time either
        ),
        (
            "print('noise')\ndef run(ctx, other):\n    return 1\n",
            "task:run",
            "task:run(ctx, other) cannot be called with the context alone",
        ),
    ],
)
def test_a_broken_package_is_refused_naming_where(
    tmp_path: Path, code: str, entrypoint: str, said: str
) -> None:
    built = _build(tmp_path, _folder(tmp_path, code, entrypoint=entrypoint))
    assert built.returncode != 0
    assert said in built.stderr, built.stderr
    assert "Traceback" not in built.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        (
            {"type": "object", "properties": {"n": {"type": "integer", "default": "five"}}},
            'params_schema.properties.n: its default "five" does not match it',
        ),
        (
            {
                "type": "object",
                "properties": {
                    "to": {
                        "type": "string",
                        "format": "email",
                        "examples": ["ops@example.com", "nope"],
                    }
                },
            },
            'params_schema.properties.to: its examples[1] "nope" does not match it',
        ),
    ],
)
def test_a_schema_that_disagrees_with_its_own_defaults_is_refused(
    tmp_path: Path, schema: dict[str, object], said: str
) -> None:
    code = "def run(ctx):\n    return 1\n"
    built = _build(tmp_path, _folder(tmp_path, code, params_schema=schema))
    assert built.returncode != 0
    assert said in built.stderr, built.stderr
