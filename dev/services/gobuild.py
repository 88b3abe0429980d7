"""Binaries built with `go` from the committed modules under dev/ (jaeger, kube, kustomize)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from services.base import Paths, Service, ServiceError, find_tool, install_step, say


def build(
    service: Service,
    paths: Paths,
    *,
    module_dir: Path,
    package: str,
    binary: Path,
    what: str,
    minutes: int,
    sources: Sequence[str] = (),
    ldflags: Sequence[str] = (),
) -> None:
    """Build ``package`` from the committed module in ``module_dir`` into ``binary``.

    Skipped when the binary is there with a stamp holding the hash of go.mod, go.sum and
    ``sources`` (files of the module itself) and ``ldflags``: changing any of them rebuilds.
    """
    stamp = binary.with_name("complete.stamp")
    digest = hashlib.sha256(
        b"".join((module_dir / f).read_bytes() for f in ("go.mod", "go.sum", *sources))
        + "\0".join(ldflags).encode()
    ).hexdigest()
    if binary.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return
    go = find_tool("go", "Go 1.24 or later (https://go.dev/doc/install)")
    say(
        f"{service.name}: building {what} with Go into {binary} "
        f"(first run only, ~{minutes} min on 2 cores; progress: {paths.install_log})..."
    )
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"{binary.name}.partial")
    stamp.unlink(missing_ok=True)
    # Only this module's go.mod/go.sum decide; the default module and build caches
    # (GOMODCACHE, GOCACHE) make a rebuild after `rm -rf cache/` take seconds.
    # No VCS stamping: it would run git on this checkout, which can refuse (ownership).
    install_step(
        service,
        paths,
        [
            go,
            "build",
            "-trimpath",
            f"-ldflags={' '.join(['-s', '-w', *ldflags])}",
            "-o",
            str(partial),
            package,
        ],
        cwd=module_dir,
        env=_go_env(),
    )
    partial.replace(binary)
    stamp.write_text(digest + "\n")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOWORK="off", GOFLAGS="-mod=readonly -buildvcs=false", CGO_ENABLED="0")
    return env


def module_dirs(service: Service, module_dir: Path, modules: Sequence[str]) -> dict[str, Path]:
    """Download ``modules`` at the versions ``module_dir``'s go.mod/go.sum pin; return their
    folders in the Go module cache (read-only trees, as the module proxy serves them)."""
    go = find_tool("go", "Go 1.24 or later (https://go.dev/doc/install)")
    argv = [go, "mod", "download", "-json", *modules]
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=module_dir,
        env=_go_env(),
        check=False,
    )
    # One JSON object per module, concatenated; a failed one carries "Error".
    decoder, text, found = json.JSONDecoder(), result.stdout, {}
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            break
        info, index = decoder.raw_decode(text, index)
        if info.get("Error") or not info.get("Dir"):
            raise ServiceError(f"{service.name}: {shlex.join(argv)}: {info.get('Error')}")
        found[info["Path"]] = Path(info["Dir"])
    missing = set(modules) - found.keys()
    if result.returncode != 0 or missing:
        raise ServiceError(
            f"{service.name}: `{shlex.join(argv)}` in {module_dir} failed "
            f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return found
