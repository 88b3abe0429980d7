"""Request params checked against the package's JSON Schema before any device is touched."""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any

import jsonschema

from mayfly.errors import ParamsError
from mayfly.packages import Manifest

__all__ = ["params_validator", "validate_params", "with_defaults"]

#: Schemas whose validator is kept: one per package version a coordinator runs.
_CACHED_SCHEMAS = 64
_BY_OBJECT: dict[int, tuple[dict[str, Any], jsonschema.protocols.Validator]] = {}


def params_validator(manifest: Manifest) -> jsonschema.protocols.Validator:
    """The validator of the manifest's params schema, built once per schema.

    Building one is most of what checking params costs; a warm parent that
    builds it before it forks hands it to every coordinator.
    """
    schema = manifest.params_schema
    known = _BY_OBJECT.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    validator = _compiled(json.dumps(schema, separators=(",", ":")))
    # The common case, a manifest fetched once and reused, skips the encoding
    # (a forked coordinator's first json.dumps costs more than the rest of
    # the check). Holding the schema keeps its id from naming another one.
    if len(_BY_OBJECT) >= _CACHED_SCHEMAS:
        _BY_OBJECT.pop(next(iter(_BY_OBJECT)))
    _BY_OBJECT[id(schema)] = (schema, validator)
    return validator


@functools.lru_cache(maxsize=_CACHED_SCHEMAS)
def _compiled(schema_json: str) -> jsonschema.protocols.Validator:
    # Keyed by the schema's JSON, not by manifest: one schema can never get the
    # validator of another. Key order is kept (not sorted): it decides which of
    # equally relevant errors is reported, which must not depend on the cache.
    # Formats are checked too (an "email" that is none is refused), as far as
    # jsonschema's checker knows them without optional libraries.
    return jsonschema.Draft202012Validator(
        json.loads(schema_json), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def with_defaults(manifest: Manifest, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (already valid) with the schema's ``default``s filled in where
    a property is missing, in nested objects too, as the package sees them.
    Only ``properties`` are followed: a default under ``anyOf`` or a ``$ref``
    is the package's to apply."""
    return _filled(manifest.params_schema, params)


def _filled(schema: Any, value: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return value
    filled = dict(value)
    for name, sub in properties.items():
        if not isinstance(sub, dict):
            continue
        if name not in filled and "default" in sub:
            filled[name] = json.loads(json.dumps(sub["default"]))  # a copy of its own
        if isinstance(filled.get(name), dict):
            filled[name] = _filled(sub, filled[name])
    return filled


def validate_params(manifest: Manifest, params: dict[str, Any]) -> None:
    """Raise :class:`ParamsError` naming the first offending param, if any.

    The most relevant error (as jsonschema ranks them) is reported, with its
    path, so ``params.config.log_level: 'loud' is not one of [...]`` tells the
    operator exactly what to fix.
    """
    error = jsonschema.exceptions.best_match(params_validator(manifest).iter_errors(params))
    if error is None:
        return
    path = ".".join(["params", *(str(p) for p in error.absolute_path)])
    # A misspelt key is the usual cause of a "required" error: name it too.
    raise ParamsError(path, error.message + _unknown_keys(manifest, params), package=manifest.name)


#: Unknown keys named at most (a request may carry any number of them).
_NAMED_KEYS = 5


def _unknown_keys(manifest: Manifest, params: dict[str, Any]) -> str:
    """``; unknown param 'colour' (did you mean 'color'?)`` for top-level keys
    the schema does not name ('' when it names them all, or names none); the
    first few only, each cut short, so the reason stays a sentence."""
    known = manifest.params_schema.get("properties")
    if not isinstance(known, dict) or not known:
        return ""
    unknown = sorted(k for k in params if k not in known)
    words = []
    for key in unknown[:_NAMED_KEYS]:
        close = difflib.get_close_matches(key[:100], list(known), n=1, cutoff=0.6)
        shown = repr(key if len(key) <= 60 else key[:57] + "...")
        words.append(f"{shown} (did you mean {close[0]!r}?)" if close else shown)
    if not words:
        return ""
    more = f" and {len(unknown) - _NAMED_KEYS} more" if len(unknown) > _NAMED_KEYS else ""
    return f"; unknown param{'s' if len(unknown) > 1 else ''} {', '.join(words)}{more}"
