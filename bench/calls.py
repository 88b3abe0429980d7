"""Where a fan-out's CPU goes: one request's devices run in this process.

``run_devices`` (the coordinator's fan-out) runs ``bench-push`` over N devices
of a simulator in its own process, with 16 task processes forked from here;
it prints actions/s and CPU per device of the coordinator (this process, its
device calls included), of its task processes and of the simulator. With
``--driver instant`` the device calls are answered at once, in process, so
what is left is the coordinator's own part (frames, bookkeeping).

    python bench/calls.py [--devices 10000] [--driver http|instant] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PUSH, PUSH_CODE, simulator

from mayfly.coordinator.runner import RunPlan, run_devices
from mayfly.coordinator.worker import CancelFlag, WorkerSpec
from mayfly.devices import Device, DeviceDriver, parse_inventory
from mayfly.devices.http import HttpDriver


class Instant:
    """A driver that answers every call at once, in process."""

    def state(self, device: Device, *, deadline: float | None = None) -> dict[str, Any]:
        return {}

    def action(
        self,
        device: Device,
        name: str,
        payload: dict[str, Any],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        return {"action": name}

    def close(self) -> None:
        pass


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _used(before: resource.struct_rusage, after: resource.struct_rusage) -> float:
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--driver", choices=["http", "instant"], default="http")
    parser.add_argument("--processes", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="cProfile the coordinator")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mayfly-bench-calls-") as tmp:
        root = Path(tmp)
        package = root / "bench-push"
        package.mkdir()
        module, _, _ = PUSH["entrypoint"].partition(":")
        (package / f"{module}.py").write_text(PUSH_CODE)
        with simulator(root, args.devices) as fleet:
            devices = list(parse_inventory(fleet.inventory.read_bytes()))
            factory: type[DeviceDriver] = Instant if args.driver == "instant" else HttpDriver
            spec = WorkerSpec(
                "bench-calls", package, PUSH["entrypoint"], 128, {}, 600, CancelFlag()
            )
            plan = RunPlan(
                spec=spec,
                devices=devices,
                driver_factory=factory,
                parallel=args.processes,
                device_timeout_s=15,
            )
            profile = cProfile.Profile() if args.profile else None
            me = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            sim, started = _cpu(fleet.child.pid), time.monotonic()
            if profile:
                profile.enable()
            results = run_devices(plan)
            if profile:
                profile.disable()
            seconds = time.monotonic() - started
            coordinator = _used(me, resource.getrusage(resource.RUSAGE_SELF))
            tasks = _used(kids, resource.getrusage(resource.RUSAGE_CHILDREN))
            simulated = _cpu(fleet.child.pid) - sim
    ok = sum(1 for r in results if r.status == "succeeded")
    n = len(devices)
    print(
        f"{args.driver}: {ok}/{n} succeeded, {n / seconds:,.0f} actions/s; CPU per device: "
        f"coordinator {coordinator / n * 1e6:.0f} µs, task processes {tasks / n * 1e6:.0f} µs, "
        f"simulator {simulated / n * 1e6:.0f} µs"
    )
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
