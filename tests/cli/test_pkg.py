"""`mayfly pkg` as a user drives it: output, exit codes, messages."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mayfly.cli import cli

from ..conftest import S3Server

Run = Callable[..., Result]
TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def mayfly(home: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("MAYFLY_HOME", str(home))
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code != 0, result.output
            assert "Traceback" not in result.output
        return result

    return run


def _sha(output: str) -> str:
    match = re.search(r"sha256:[0-9a-f]{64}", output)
    assert match, output
    return match.group(0)


def test_build_twice_and_on_a_touched_copy_gives_one_sha256(mayfly: Run, tmp_path: Path) -> None:
    first = _sha(
        mayfly(
            "pkg", "build", str(TASKPKGS / "firmware-update"), "-o", str(tmp_path / "a.tgz")
        ).output
    )
    second = _sha(
        mayfly(
            "pkg", "build", str(TASKPKGS / "firmware-update"), "-o", str(tmp_path / "b.tgz")
        ).output
    )
    copy = tmp_path / "copy"
    shutil.copytree(TASKPKGS / "firmware-update", copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_900_000_000, 1_900_000_000))
    third = _sha(mayfly("pkg", "build", str(copy), "-o", str(tmp_path / "c.tgz")).output)
    assert first == second == third
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "c.tgz").read_bytes()


def test_publish_list_promote_verify_fetch(mayfly: Run, home: Path, tmp_path: Path) -> None:
    mayfly("pkg", "keygen")
    out = mayfly("pkg", "publish", str(TASKPKGS / "reboot")).output
    assert "published reboot 1.0.0 sha256:" in out
    assert "channel stable: (new) -> 1.0.0" in out
    again = mayfly("pkg", "publish", str(TASKPKGS / "reboot")).output
    assert "already published (same bytes)" in again
    listing = mayfly("pkg", "list").output
    assert re.search(r"reboot\s+1\.0\.0\s+sha256:[0-9a-f]{64}\s+\[stable\]", listing)
    assert "canary" in mayfly("pkg", "promote", "reboot", "1.0.0", "canary").output
    assert mayfly("pkg", "verify", "reboot@canary").output.startswith("ok reboot 1.0.0")
    dest = tmp_path / "fetched"
    mayfly("pkg", "fetch", "reboot@1.0.0", "--to", str(dest))
    assert (dest / "reboot.py").read_bytes() == (TASKPKGS / "reboot" / "reboot.py").read_bytes()


def test_verify_refuses_flipped_byte_and_untrusted_key(mayfly: Run, tmp_path: Path) -> None:
    mayfly("pkg", "keygen")
    archive = tmp_path / "fw.tgz"
    mayfly("pkg", "build", str(TASKPKGS / "firmware-update"), "-o", str(archive))
    mayfly("pkg", "sign", str(archive))
    assert mayfly("pkg", "verify", str(archive)).output.startswith("ok firmware-update 1.0.1")

    flipped = tmp_path / "flipped.tgz"
    data = bytearray(archive.read_bytes())
    data[200] ^= 0x01
    flipped.write_bytes(bytes(data))
    shutil.copy(f"{archive}.sig", f"{flipped}.sig")
    refused = mayfly("pkg", "verify", str(flipped), ok=False)
    assert refused.exit_code == 1
    assert "refused: firmware-update 1.0.1: archive digest" in refused.stderr

    mayfly("pkg", "keygen", "--out", str(tmp_path / "stranger"), "--no-trust")
    mayfly("pkg", "sign", str(archive), "--key", str(tmp_path / "stranger" / "signing.key"))
    untrusted = mayfly("pkg", "verify", str(archive), ok=False)
    assert re.search(
        r"firmware-update 1\.0\.1: signed by key \w+, which is not trusted", untrusted.stderr
    )


def test_fetch_refuses_tampered_store_bytes(mayfly: Run, home: Path) -> None:
    mayfly("pkg", "keygen")
    mayfly("pkg", "publish", str(TASKPKGS / "config-push"))
    stored = home / "packages" / "config-push" / "1.0.0" / "package.tar.gz"
    data = bytearray(stored.read_bytes())
    data[-20] ^= 0x01
    stored.write_bytes(bytes(data))
    refused = mayfly("pkg", "fetch", "config-push", ok=False)
    assert "refused: config-push 1.0.0: archive digest" in refused.stderr
    assert not (home / "cache").exists()


def test_republishing_other_bytes_is_refused(mayfly: Run, home: Path, tmp_path: Path) -> None:
    mayfly("pkg", "keygen")
    mayfly("pkg", "publish", str(TASKPKGS / "reboot"))
    stored = (home / "packages" / "reboot" / "1.0.0" / "package.tar.gz").read_bytes()
    changed = tmp_path / "reboot"
    shutil.copytree(TASKPKGS / "reboot", changed)
    with (changed / "reboot.py").open("a") as fh:
        fh.write("# a change\n")
    refused = mayfly("pkg", "publish", str(changed), ok=False)
    assert "reboot 1.0.0: version already published" in refused.stderr
    assert "bump the version" in refused.stderr
    assert (home / "packages" / "reboot" / "1.0.0" / "package.tar.gz").read_bytes() == stored


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pkg", "publish", "taskpkgs/reboot"), "mayfly pkg keygen"),
        (("pkg", "verify", "nosuch"), "nosuch: package not published"),
        (("pkg", "list", "nosuch"), "nosuch: no published versions"),
        (("pkg", "promote", "reboot", "1.0.0", "stable"), "reboot 1.0.0: version not published"),
    ],
)
def test_mistakes_are_one_readable_line(mayfly: Run, args: tuple[str, ...], message: str) -> None:
    result = mayfly(*args, ok=False)
    assert result.exit_code == 1
    assert message in result.stderr


def test_invalid_manifest_names_the_field(mayfly: Run, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(TASKPKGS / "reboot", folder)
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"1.0.0"', '"one"'))
    result = mayfly("pkg", "build", str(folder), ok=False)
    assert "field 'version'" in result.stderr
    assert "not a semantic version" in result.stderr


def test_usage_errors_exit_2(mayfly: Run) -> None:
    assert mayfly("pkg", "build", ok=False).exit_code == 2
    assert mayfly("pkg", "frobnicate", ok=False).exit_code == 2


@pytest.mark.parametrize(
    "command", ["keygen", "build", "sign", "publish", "list", "promote", "verify", "fetch"]
)
def test_every_command_explains_itself(mayfly: Run, command: str) -> None:
    text = mayfly("pkg", command, "--help").output
    assert "Usage: " in text
    assert len(text.splitlines()) > 4


@pytest.mark.s3
def test_publish_and_verify_on_s3(
    mayfly: Run, s3_bucket: tuple[S3Server, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bucket = s3_bucket
    monkeypatch.setenv("MAYFLY_S3_ACCESS_KEY", server.access_key)
    monkeypatch.setenv("MAYFLY_S3_SECRET_KEY", server.secret_key)
    s3 = ("--store", f"s3://{bucket}", "--s3-endpoint", server.endpoint)
    mayfly("pkg", "keygen")
    out = mayfly("pkg", "publish", str(TASKPKGS / "firmware-update"), *s3).output
    assert f"to s3://{bucket} at {server.endpoint}" in out
    assert "ok firmware-update 1.0.1" in mayfly("pkg", "verify", "firmware-update", *s3).output
    keys = [o.object_name for o in server.client().list_objects(bucket, recursive=True)]
    assert sorted(keys) == [
        "firmware-update/1.0.1/manifest.json",
        "firmware-update/1.0.1/package.sig",
        "firmware-update/1.0.1/package.tar.gz",
        "firmware-update/channels/stable",
    ]
