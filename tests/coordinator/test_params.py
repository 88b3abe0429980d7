"""Params are checked against the package's schema, with a validator built once per schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mayfly.coordinator.params import params_validator, validate_params
from mayfly.errors import ParamsError
from mayfly.events import TaskCompleted, new_request
from mayfly.packages import Manifest, parse_manifest

from .conftest import Env, FleetFactory, write_package

TASKPKGS = Path(__file__).parents[2] / "taskpkgs"


def _manifest(schema: dict[str, Any], version: str = "1.0.0") -> Manifest:
    raw = {"name": "demo", "version": version, "entrypoint": "task:run", "params_schema": schema}
    return parse_manifest(json.dumps(raw))


def _config_push() -> Manifest:
    return parse_manifest((TASKPKGS / "config-push" / "manifest.json").read_bytes())


def test_the_offending_param_is_named_with_the_reason() -> None:
    manifest = _config_push()
    for _ in range(2):  # the same, whether the validator was built or reused
        with pytest.raises(ParamsError) as caught:
            validate_params(manifest, {"config": {"log_level": "loud"}})
        assert caught.value.field == "params.config.log_level"
        assert "'loud' is not one of ['debug', 'info', 'warning', 'error']" in str(caught.value)
    validate_params(manifest, {"config": {"log_level": "info"}})


def test_a_validator_is_built_once_per_schema() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    first = params_validator(_manifest(schema))
    assert params_validator(_manifest(schema, "1.0.1")) is first  # another version, same schema
    other = {"type": "object", "properties": {"n": {"type": "string"}}}
    assert params_validator(_manifest(other)) is not first
    validate_params(_manifest(schema), {"n": 3})
    with pytest.raises(ParamsError, match=r"3 is not of type 'string'"):
        validate_params(_manifest(other), {"n": 3})


def test_a_misspelt_key_is_named_beside_the_error_it_causes() -> None:
    manifest = _manifest(
        {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    )
    with pytest.raises(ParamsError) as caught:
        validate_params(manifest, {"colour": "red"})
    assert caught.value.reason == (
        "'color' is a required property; unknown param 'colour' (did you mean 'color'?)"
    )


def test_thousands_of_unknown_keys_make_one_short_sentence() -> None:
    manifest = _manifest(
        {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    )
    params = {f"k{i:05d}" + "x" * 500: i for i in range(5000)}
    with pytest.raises(ParamsError) as caught:
        validate_params(manifest, params)
    reason = caught.value.reason
    assert reason.startswith("'color' is a required property; unknown params 'k00000xxx")
    assert reason.endswith(" and 4995 more")
    assert len(reason) < 600


def test_a_format_the_schema_names_is_checked() -> None:
    manifest = _manifest({"type": "object", "properties": {"to": {"format": "email"}}})
    with pytest.raises(ParamsError) as caught:
        validate_params(manifest, {"to": "nobody"})
    assert caught.value.field == "params.to"
    assert "'nobody' is not a 'email'" in str(caught.value)
    validate_params(manifest, {"to": "ops@example.com"})


def test_the_schemas_defaults_are_what_the_package_sees_for_missing_params(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "mode": {"enum": ["merge", "replace"], "default": "merge"},
            "retry": {
                "type": "object",
                "properties": {"times": {"type": "integer", "default": 3}, "wait_s": {}},
                "default": {},
            },
            "given": {"type": "string", "default": "unused"},
        },
    }
    manifest = {"name": "echo", "version": "1.0.0", "entrypoint": "task:run"}
    code = "def run(ctx):\n    return ctx.params\n"
    env.publish(write_package(tmp_path / "echo", manifest | {"params_schema": schema}, code))
    fleet(1)
    request = new_request("echo", devices=["sim-0001"], params={"given": "mine"})
    result = env.coordinator().handle(request)
    assert isinstance(result, TaskCompleted)
    [device] = result.devices
    assert device.output == {"mode": "merge", "retry": {"times": 3}, "given": "mine"}
    assert request.params == {"given": "mine"}  # the request itself is as it was sent
