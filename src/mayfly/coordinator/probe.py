"""``python -m mayfly.coordinator.probe DIR ENTRYPOINT MEMORY_MB``: import a
built package's entrypoint in the task processes' sandbox, and say what it
found, as the last line of stdout (one JSON object).

A build runs this on the package it just built (extracted read-only, as the
package cache holds it), so an import that fails (a misspelt entrypoint, a
module that raises, a dependency that does not load) is refused by ``pkg
build`` with the file and line, instead of failing every device at run time.
The author's code runs here, so it runs sandboxed: no network, no secrets,
writes only to a scratch folder, the manifest's memory limit.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

__all__ = ["main"]

#: CPU seconds an import may take.
_CPU_S = 30


def _where(exc: BaseException, package_dir: Path) -> str | None:
    """``file:line`` of the innermost frame in the package's own files."""
    inside = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.startswith(f"{package_dir}{os.sep}")
    ]
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{Path(exc.filename).name}:{exc.lineno}"
    if not inside:
        return None
    return f"{Path(inside[-1].filename).relative_to(package_dir)}:{inside[-1].lineno}"


def _probe(package_dir: Path, entrypoint: str, memory_mb: int) -> dict[str, Any]:
    from mayfly.coordinator.worker import apply_limits, load_entrypoint
    from mayfly.sandbox import SandboxSpec, enter

    applied = enter(
        SandboxSpec(
            package_dir=package_dir,
            scratch_dir=Path(tempfile.gettempdir()) / f"mayfly-probe-{os.getpid()}",
        ),
        keep_fds=set(),
    )
    apply_limits(memory_mb, _CPU_S)
    try:
        fn = load_entrypoint(package_dir, entrypoint)
    except BaseException as exc:  # the author's code: anything at all
        error = f"{type(exc).__name__}: {exc}"[:1000]
        return {"ok": False, "error": error, "where": _where(exc, package_dir)}
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return {"ok": True, "function": entrypoint, "sandbox": applied.layers}
    try:
        signature.bind(object())
    except TypeError as exc:
        return {
            "ok": False,
            "error": f"{entrypoint}{signature} cannot be called with the context alone: {exc}",
            "where": None,
        }
    return {"ok": True, "function": f"{entrypoint}{signature}", "sandbox": applied.layers}


def main(argv: list[str]) -> int:
    package_dir, entrypoint, memory_mb = Path(argv[0]), argv[1], int(argv[2])
    found = _probe(package_dir, entrypoint, memory_mb)
    sys.stdout.flush()
    print("\n" + json.dumps(found), flush=True)  # last: the package may have printed
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
