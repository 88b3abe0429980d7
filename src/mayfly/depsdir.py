"""Where a built package keeps its dependencies, and what they provide.

A leaf module: task processes import it (to put the folder on their path)
without importing :mod:`mayfly.packages`, which is the coordinator's.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEPS_DIR", "provided_modules"]

#: The folder of a package that holds its unpacked dependencies.
DEPS_DIR = "_deps"


def provided_modules(deps: Path) -> frozenset[str]:
    """The top-level module names a dependencies folder provides."""
    names: set[str] = set()
    try:
        entries = list(deps.iterdir())
    except OSError:
        return frozenset()
    for entry in entries:
        if entry.name.endswith((".dist-info", ".data")):
            continue
        if entry.is_dir():
            names.add(entry.name)
        elif entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.split(".", 1)[0])
    return frozenset(names)
