"""What a build checks of a package before it is an archive, so a mistake is
refused where it is made, not found on every device at run time.

- Every module compiles: a ``SyntaxError`` is refused with its file and line.
- The params schema agrees with itself: each ``default`` and each of the
  ``examples`` it gives is valid against the (sub)schema that gives it,
  formats included.

Importing the entrypoint runs the author's code, so it happens in a
sandboxed process, not here: :mod:`mayfly.coordinator.probe`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema

from mayfly.errors import PackageError
from mayfly.packages.manifest import Manifest

__all__ = ["compile_modules", "schema_examples"]

#: Subschema keywords whose value is one schema, a list of them, or a map of them.
_ONE = ("items", "additionalProperties", "contains", "not", "if", "then", "else")
_MANY = ("prefixItems", "allOf", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "dependentSchemas")


def compile_modules(folder: Path, files: list[Path], manifest: Manifest) -> int:
    """Compile every ``.py`` of ``files`` (paths below ``folder``); how many.

    Raises:
        PackageError: ``file:line: SyntaxError: ...`` for the first that does not.
    """
    count = 0
    for path in files:
        if path.suffix != ".py" or not path.is_file():
            continue
        shown = path.relative_to(folder).as_posix()
        try:
            compile(path.read_bytes(), shown, "exec", dont_inherit=True)
        except SyntaxError as exc:  # IndentationError and TabError are ones too
            where = f"{shown}:{exc.lineno}" if exc.lineno else shown
            raise PackageError(
                f"{where}: {type(exc).__name__}: {exc.msg}",
                package=manifest.name,
                version=manifest.version,
            ) from exc
        except ValueError as exc:  # a NUL byte in the source
            raise PackageError(f"{shown}: {exc}", package=manifest.name) from exc
        count += 1
    return count


def _subschemas(schema: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in _ONE:
        yield from _subschemas(schema.get(key), f"{path}.{key}")
    for key in _MANY:
        subs = schema.get(key)
        if isinstance(subs, list):
            for i, sub in enumerate(subs):
                yield from _subschemas(sub, f"{path}.{key}[{i}]")
    for key in _MAP:
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield from _subschemas(sub, f"{path}.{key}.{name}")


def schema_examples(manifest: Manifest) -> tuple[int, int]:
    """Check the params schema's own ``default``s and ``examples`` against it;
    how many of each.

    Raises:
        PackageError: naming the schema path and the value that does not match.
    """
    root = manifest.params_schema
    validator = jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    defaults = examples = 0
    for path, sub in _subschemas(root, "params_schema"):
        given: list[tuple[str, Any]] = []
        if "default" in sub:
            given.append(("default", sub["default"]))
        if isinstance(sub.get("examples"), list):
            given += [(f"examples[{i}]", v) for i, v in enumerate(sub["examples"])]
        for what, value in given:
            try:
                error = jsonschema.exceptions.best_match(
                    validator.evolve(schema=sub).iter_errors(value)
                )
            except jsonschema.exceptions.SchemaError:
                continue  # a $ref this subschema cannot resolve alone: the whole is valid
            if error is not None:
                shown = json.dumps(value)[:80]
                raise PackageError(
                    f"manifest.json: {path}: its {what} {shown} does not match it: {error.message}",
                    package=manifest.name,
                    version=manifest.version,
                )
            if what == "default":
                defaults += 1
            else:
                examples += 1
    return defaults, examples
