"""Packages that carry their dependencies: resolved when built (a pure-Python
library and one with a compiled wheel, neither in Mayfly's environment),
signed with the code, and imported by task processes with no index at run
time; two versions of one library side by side; what cannot be resolved is
refused when built, naming the requirement."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mayfly.errors import ManifestError, PackageError
from mayfly.packages import build_package
from mayfly.packages.archive import archive_tree

from .conftest import Env, FleetFactory, write_package
from .test_job import _job

pytestmark = pytest.mark.usefixtures("package_index")

CODE = """
import humanize
import msgpack
from msgpack import _cmsgpack  # the compiled extension, not the fallback


def run(ctx):
    state = ctx.device.state()
    packed = msgpack.packb({"id": ctx.device.id, "boots": state["boot_count"]})
    return {
        "humanize": humanize.__version__,
        "size": humanize.naturalsize(len(packed) * 1000),
        "msgpack": ".".join(map(str, msgpack.version)),
        "compiled": _cmsgpack.__file__.endswith(".so"),
        "from": humanize.__file__,
    }
"""


def _manifest(name: str, dependencies: list[str], version: str = "1.0.0") -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "entrypoint": "task:run",
        "dependencies": dependencies,
    }


def test_a_package_with_dependencies_runs_on_50_devices_with_no_index(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    for library in ("humanize", "msgpack"):  # else the test proves nothing
        found = subprocess.run([sys.executable, "-c", f"import {library}"], check=False)
        assert found.returncode != 0, f"{library} is in Mayfly's own environment"
    folder = write_package(
        tmp_path / "pack",
        _manifest("pack", ["humanize==4.17.0", "msgpack==1.2.4"]),
        CODE,
    )
    built = build_package(folder, wheel_cache=tmp_path / "wheels")
    tree = archive_tree(built.data)
    # The digest (and so the signature) covers the dependencies' files.
    assert "_deps/humanize/__init__.py" in tree
    assert any(k.startswith("_deps/msgpack/_cmsgpack") and k.endswith(".so") for k in tree)
    again = build_package(folder, wheel_cache=tmp_path / "wheels")
    assert again.digest == built.digest  # the same folder, the same bytes

    env.publish(folder)
    sim = fleet(50).simulator
    # Any pip call now would fail: nothing is fetched when a request runs.
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1"}
    job = _job(env, TASK_TYPE="pack", DEVICE_IDS=",".join(sim.device_ids()), **offline)
    assert job.returncode == 0, job.stderr
    [event] = env.result_events()
    devices = event["data"]["devices"]  # type: ignore[index]
    assert len(devices) == 50
    for device in devices:
        output = device["output"]
        assert device["status"] == "succeeded", device
        assert output["humanize"] == "4.17.0"
        assert output["msgpack"] == "1.2.4"
        assert output["compiled"] is True
        assert "/_deps/humanize/" in output["from"]


def test_two_packages_with_two_versions_of_one_library_run_side_by_side(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    code = "import humanize\n\ndef run(ctx):\n    return {'humanize': humanize.__version__}\n"
    for name, pin in (("old-lib", "4.9.0"), ("new-lib", "4.17.0")):
        env.publish(write_package(tmp_path / name, _manifest(name, [f"humanize=={pin}"]), code))
    sim = fleet(2).simulator
    ids = ",".join(sim.device_ids())
    for name in ("old-lib", "new-lib"):
        job = _job(env, TASK_TYPE=name, DEVICE_IDS=ids)
        assert job.returncode == 0, job.stderr
    old, new = env.result_events()
    assert {d["output"]["humanize"] for d in old["data"]["devices"]} == {"4.9.0"}  # type: ignore[index]
    assert {d["output"]["humanize"] for d in new["data"]["devices"]} == {"4.17.0"}  # type: ignore[index]


def test_an_unresolvable_dependency_is_refused_when_built_naming_it(tmp_path: Path) -> None:
    folder = write_package(
        tmp_path / "nope", _manifest("nope", ["mayfly-no-such-library-anywhere==1.0"]), CODE
    )
    with pytest.raises(PackageError) as refused:
        build_package(folder, wheel_cache=tmp_path / "wheels")
    assert "mayfly-no-such-library-anywhere==1.0" in str(refused.value)
    assert "cannot be resolved for Python 3.11" in str(refused.value)
    cli = subprocess.run(
        [sys.executable, "-m", "mayfly", "pkg", "build", str(folder), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cli.returncode != 0
    assert "mayfly-no-such-library-anywhere" in cli.stderr
    assert "Traceback" not in cli.stderr


@pytest.mark.parametrize(
    ("requirement", "said"),
    [
        ("humanize @ https://example.com/humanize.whl", "names a URL"),
        ("humanize ===>< 1", "is not a PEP 508 requirement"),
    ],
)
def test_a_requirement_that_is_no_index_name_is_refused_by_the_manifest(
    tmp_path: Path, requirement: str, said: str
) -> None:
    folder = write_package(tmp_path / "bad", _manifest("bad", [requirement]), CODE)
    with pytest.raises(ManifestError, match=said):
        build_package(folder)


def test_a_folder_of_its_own_named_deps_is_refused(tmp_path: Path) -> None:
    folder = write_package(tmp_path / "own", _manifest("own", []), CODE)
    (folder / "_deps").mkdir()
    (folder / "_deps" / "x.py").write_text("")
    with pytest.raises(PackageError, match="dependencies"):
        build_package(folder)


def test_dependencies_over_a_packages_bounds_are_refused_while_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mayfly.packages import deps

    monkeypatch.setattr(deps, "_MAX_FILES", 5)  # humanize alone has more files
    folder = write_package(tmp_path / "big", _manifest("big", ["humanize==4.17.0"]), CODE)
    with pytest.raises(PackageError, match=r"over a package's bounds .* at humanize-4\.17\.0"):
        build_package(folder, wheel_cache=tmp_path / "wheels")
