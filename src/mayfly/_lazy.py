"""Package exports imported on first use (PEP 562).

A task process is started from a small interpreter that imports only what
running package code needs (:mod:`mayfly.coordinator.zygote`). A package
``__init__`` that imported its whole public surface eagerly would drag the
coordinator's dependencies (the package store, jsonschema, cryptography)
into it with the first ``import mayfly.coordinator.<anything>``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["exports"]


def exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose names live in the
    modules ``where`` gives (name -> module)."""
    namespace = importlib.import_module(package).__dict__

    def getattr_(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # the next lookup is a plain global
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *where})

    return getattr_, dir_
