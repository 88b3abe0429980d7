"""Request params checked against the package's JSON Schema before any device is touched."""

from __future__ import annotations

from typing import Any

import jsonschema

from mayfly.errors import ParamsError
from mayfly.packages import Manifest

__all__ = ["validate_params"]


def validate_params(manifest: Manifest, params: dict[str, Any]) -> None:
    """Raise :class:`ParamsError` naming the first offending param, if any.

    The most relevant error (as jsonschema ranks them) is reported, with its
    path, so ``params.config.log_level: 'loud' is not one of [...]`` tells the
    operator exactly what to fix.
    """
    validator = jsonschema.Draft202012Validator(manifest.params_schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(params))
    if error is None:
        return
    path = ".".join(["params", *(str(p) for p in error.absolute_path)])
    raise ParamsError(path, error.message, package=manifest.name)
