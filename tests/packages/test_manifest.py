from __future__ import annotations

import json
from pathlib import Path

import pytest

from mayfly.errors import ManifestError
from mayfly.packages import load_manifest, parse_manifest

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"

GOOD = {
    "name": "reboot",
    "version": "1.2.3",
    "entrypoint": "reboot:run",
    "limits": {"timeout_s": 10, "device_timeout_s": 5, "max_parallel": 4, "retries": 1},
}


@pytest.mark.parametrize("folder", sorted(p.name for p in TASKPKGS.iterdir() if p.is_dir()))
def test_example_packages_have_valid_manifests(folder: str) -> None:
    manifest = load_manifest(TASKPKGS / folder)
    assert manifest.name == folder
    assert (TASKPKGS / folder / f"{manifest.module.replace('.', '/')}.py").is_file()


def test_defaults_fill_limits() -> None:
    m = parse_manifest(json.dumps({"name": "x", "version": "0.1.0", "entrypoint": "m:f"}))
    assert m.limits.retries == 2
    assert m.module == "m"
    assert m.function == "f"


def test_canonical_json_is_stable() -> None:
    a = parse_manifest(json.dumps(GOOD))
    b = parse_manifest(json.dumps(dict(reversed(list(GOOD.items())))))
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "1.2"}, "version"),
        ({"name": "Bad Name"}, "name"),
        ({"entrypoint": "no-colon"}, "entrypoint"),
        ({"limits": {"retries": -1}}, "limits.retries"),
        ({"limits": {"timeout_s": 0}}, "limits.timeout_s"),
        ({"params_schema": {"type": "nonsense"}}, "params_schema"),
        ({"capabilities": ["UPPER CASE"]}, "capabilities"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_manifest_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(json.dumps(GOOD | change))
    assert f"field {field!r}" in str(err.value)


def test_missing_required_field() -> None:
    with pytest.raises(ManifestError, match="'entrypoint'"):
        parse_manifest(json.dumps({"name": "x", "version": "1.0.0"}))


def test_not_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest("{nope")


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        load_manifest(tmp_path)
