"""A built package's entrypoint imported in the sandbox, before it is
published: :mod:`mayfly.coordinator.probe` in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mayfly.errors import PackageError
from mayfly.packages import BuiltPackage
from mayfly.packages.archive import extract_archive, remove_tree

__all__ = ["probe_built"]

#: How long the import may take, wall time.
_PROBE_TIMEOUT_S = 60.0


def probe_built(built: BuiltPackage) -> str:
    """Import ``built``'s entrypoint in the task processes' sandbox, from the
    archive extracted read-only as the cache holds it; what was found.

    Raises:
        PackageError: the import failed (its error, and the package file and
            line when they are the package's), or the function cannot take
            the context alone.
    """
    m = built.manifest
    where = {"package": m.name, "version": m.version}
    scratch = Path(tempfile.mkdtemp(prefix="mayfly-probe-"))
    try:
        dest = extract_archive(built.data, scratch / "package", read_only=True)
        command = [sys.executable, "-P", "-m", "mayfly.coordinator.probe"]
        command += [str(dest), m.entrypoint, str(m.limits.memory_mb)]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_PROBE_TIMEOUT_S,
                cwd=scratch,
                check=False,
                env={"PATH": "/usr/bin:/bin", "TMPDIR": str(scratch)},
            )
        except subprocess.TimeoutExpired as exc:
            raise PackageError(
                f"importing {m.entrypoint} took over {_PROBE_TIMEOUT_S:g} s", **where
            ) from exc
    finally:
        remove_tree(scratch)
    lines = done.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        tail = (done.stderr or done.stdout).strip()[-400:]
        raise PackageError(
            f"importing {m.entrypoint} in the sandbox ended with exit {done.returncode}: {tail}",
            **where,
        )
    if not found.get("ok"):
        at = f" (at {found['where']})" if found.get("where") else ""
        raise PackageError(f"entrypoint {m.entrypoint}: {found.get('error')}{at}", **where)
    layers = ", ".join(found.get("sandbox") or ()) or "none"
    return f"entrypoint {found.get('function')} imports in the sandbox ({layers})"
