"""The sandbox's cost per task process: fork to ready, with and without it.

A task process is forked from its coordinator and enters the sandbox
(:mod:`mayfly.sandbox`) before it imports package code. This forks the same
way from this (warm) process, ``--runs`` times each: a bare fork that answers
at once (the baseline), and a fork that enters the sandbox and then answers;
the child also times each layer. Loopback only, bounded by ``--runs``.

    python bench/sandbox.py [--runs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mayfly.sandbox import SandboxSpec, enter, landlock, seccomp


def _child(write_fd: int, sandboxed: bool, scratch: Path) -> None:
    marks: dict[str, float] = {}
    try:
        if sandboxed:
            start = time.perf_counter()
            applied = enter(
                SandboxSpec(package_dir=scratch, scratch_dir=scratch / f"t-{os.getpid()}"),
                keep_fds={write_fd},
            )
            marks["enter_ms"] = (time.perf_counter() - start) * 1000
            marks["layers"] = len(applied.layers)  # type: ignore[assignment]
        os.write(write_fd, json.dumps(marks).encode())
    finally:
        os._exit(0)


def _once(sandboxed: bool, scratch: Path) -> tuple[float, dict[str, float]]:
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, sandboxed, scratch)
    os.close(write_fd)
    data = os.read(read_fd, 4096)
    took = (time.perf_counter() - start) * 1000
    os.close(read_fd)
    os.waitpid(pid, 0)
    return took, json.loads(data or b"{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mayfly-bench-sandbox-") as tmp:
        scratch = Path(tmp)
        os.chmod(scratch, 0o711)
        bare = [_once(False, scratch)[0] for _ in range(args.runs)]
        runs = [_once(True, scratch) for _ in range(args.runs)]
    boxed = [took for took, _ in runs]
    enter_ms = [marks["enter_ms"] for _, marks in runs]
    figures = {
        "runs": args.runs,
        "landlock_abi": landlock.abi_version(),
        "seccomp": seccomp.supported(),
        "bare_fork_p50_ms": statistics.median(bare),
        "sandboxed_fork_p50_ms": statistics.median(boxed),
        "enter_p50_ms": statistics.median(enter_ms),
        "cost_p50_ms": statistics.median(boxed) - statistics.median(bare),
    }
    print(
        f"task process, fork to ready ({args.runs} runs each; Landlock ABI "
        f"{figures['landlock_abi']}, seccomp {'on' if figures['seccomp'] else 'off'}):\n"
        f"  bare fork        p50 {figures['bare_fork_p50_ms']:6.2f} ms\n"
        f"  sandboxed fork   p50 {figures['sandboxed_fork_p50_ms']:6.2f} ms"
        f"  (enter() itself {figures['enter_p50_ms']:.2f} ms)\n"
        f"  sandbox cost     p50 {figures['cost_p50_ms']:6.2f} ms per task process"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    sys.exit(main())
