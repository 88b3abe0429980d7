"""A package's dependencies: resolved when it is built, carried inside it.

``dependencies`` in the manifest are PEP 508 requirements (names from the
package index, no URLs). Building the package resolves them with pip, wheels
only, for the interpreter that builds (Python 3.11 on the coordinator's
platform: build where the coordinators run, or in their image), and unpacks
each wheel into the package's :data:`DEPS_DIR` folder. The archive then holds
them beside the code, so:

- the digest and the signature cover every file of every dependency, and the
  package cache checks them before each run like the code's own files;
- nothing is fetched or installed when a request runs: no index, no network,
  no install step in a coordinator's cold start;
- a task process puts the folder on its path right after the package's own
  code and before Mayfly's environment, so two packages needing different
  versions of one library run side by side, each with its own.

Resolved wheels are cached per requirement set and interpreter, so building
the same folder again gives the same bytes; pin versions (``==``) for the
same digest on another machine.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from mayfly.depsdir import DEPS_DIR
from mayfly.errors import PackageError

__all__ = [
    "DEPS_DIR",
    "MAX_DEPENDENCIES",
    "check_requirement",
    "resolve_dependencies",
]

#: Requirements one manifest may list.
MAX_DEPENDENCIES = 50
_MAX_REQUIREMENT = 200
#: How long resolving may take: pip reads the index.
_RESOLVE_TIMEOUT_S = 600.0


def check_requirement(text: str) -> str:
    """``text`` if it is a PEP 508 requirement of a name from the index.

    Raises:
        ValueError: naming what is wrong (a URL, a bad name, too long).
    """
    # Here, not at the top: task processes import this module for its folder's name.
    from packaging.requirements import InvalidRequirement, Requirement

    if len(text) > _MAX_REQUIREMENT:
        raise ValueError(f"{text[:40]!r}... is over {_MAX_REQUIREMENT} characters")
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise ValueError(f"{text!r} is not a PEP 508 requirement: {exc}") from exc
    if requirement.url:
        raise ValueError(f"{text!r} names a URL; only names from the package index are resolved")
    return text


def _interpreter() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{platform.machine()}"


def _download(requirements: Sequence[str], into: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(into),
        *requirements,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_RESOLVE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackageError(f"dependencies not resolved: pip did not finish: {exc}") from exc
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
        why = "; ".join(errors[:3]) or done.stderr.strip()[-500:] or f"pip exited {done.returncode}"
        raise PackageError(
            f"dependencies {', '.join(requirements)} cannot be resolved for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} on {sys.platform} "
            f"{platform.machine()} (wheels only): {why}"
        )


def _wheels(requirements: Sequence[str], cache: Path | None) -> list[Path]:
    """The wheels ``requirements`` resolve to, from the cache when it has them."""
    key = hashlib.sha256(json.dumps([sorted(requirements), _interpreter()]).encode()).hexdigest()[
        :32
    ]
    if cache is not None:
        kept = cache / key
        if (kept / "complete").is_file():
            return sorted(kept.glob("*.whl"))
        cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="mayfly-wheels-", dir=cache))
    try:
        _download(requirements, staging)
        wheels = sorted(staging.glob("*.whl"))
        if cache is None:
            return wheels
        (staging / "complete").write_text("\n".join(w.name for w in wheels) + "\n")
        try:
            staging.rename(cache / key)
        except OSError:  # another build cached it meanwhile: use that one
            shutil.rmtree(staging, ignore_errors=True)
        return sorted((cache / key).glob("*.whl"))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _unpacked_name(member: str) -> str | None:
    """Where a wheel member goes below :data:`DEPS_DIR` (None: not needed to
    import it: scripts, headers, data files)."""
    parts = PurePosixPath(member).parts
    if not parts or member.startswith("/") or ".." in parts:
        raise PackageError(f"a wheel member {member[:80]!r} is outside the wheel")
    if parts[0].endswith(".data"):
        if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
            return "/".join(parts[2:])
        return None
    return "/".join(parts)


#: What the unpacked dependencies of one package may hold at most: a package's
#: own bounds (``ArchiveLimits``), checked while unpacking, not after.
_MAX_FILES, _MAX_BYTES = 2_000, 64 * 1024 * 1024


def _unpack(wheel: Path, into: Path, budget: list[int]) -> None:
    """Unpack ``wheel`` into ``into``, counting its files and bytes against
    ``budget`` (files left, bytes left)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackageError(f"{wheel.name} is not a wheel: {exc}") from exc
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            # zipfile reads no more than a member's declared size (and checks its CRC).
            budget[0], budget[1] = budget[0] - 1, budget[1] - info.file_size
            if budget[0] < 0 or budget[1] < 0:
                raise PackageError(
                    f"dependencies over a package's bounds ({_MAX_FILES} files, "
                    f"{_MAX_BYTES // 2**20} MiB) at {wheel.name}"
                )
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: a zip tool that says none
            if kind and kind != stat.S_IFREG:
                raise PackageError(f"{wheel.name}: {info.filename} is not a regular file")
            name = _unpacked_name(info.filename)
            if name is None:
                continue
            target = into / name
            if target.exists():
                raise PackageError(f"{wheel.name}: {name} is also in another dependency")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def resolve_dependencies(requirements: Sequence[str], into: Path, cache: Path | None) -> None:
    """Resolve ``requirements`` and unpack their wheels into ``into`` (made here).

    Raises:
        PackageError: when they cannot be resolved for this interpreter, with
            pip's reason, or a wheel is not what a wheel may be.
    """
    into.mkdir(parents=True)
    budget = [_MAX_FILES, _MAX_BYTES]
    for wheel in _wheels(requirements, cache):
        _unpack(wheel, into, budget)
