"""``mayfly pkg run``: an unpublished package folder run against devices, as
a development run.

The folder is built and checked as ``pkg build`` does, signed with a
throwaway key into a throwaway store in a temporary home (so the run takes
the exact path a published version takes: fetch, verify, the package cache,
the coordinator, its task processes and their sandbox), and run by a
coordinator whose results say ``mode: dev``. Nothing is written to the
configured store, no signing key of the user's is needed, and the result goes
to the terminal only, never to a log or the aggregator.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mayfly.app.pkgcheck import probe_built
from mayfly.app.publishing import ensure_signing_key
from mayfly.app.wiring import build_coordinator, open_repository
from mayfly.coordinator.core import Sharded
from mayfly.coordinator.pipeline import Outcome
from mayfly.coordinator.schedule import Deferred
from mayfly.events import new_request
from mayfly.packages import build_package, load_private_key, sign_built
from mayfly.packages.archive import remove_tree
from mayfly.settings import Settings

__all__ = ["DEV_MODE", "dev_run", "simulated_inventory"]

#: The coordinator mode a development run's results carry.
DEV_MODE = "dev"


@contextmanager
def simulated_inventory(
    count: int,
    folder: Path,
    *,
    actions: Mapping[str, Any] | None = None,
    capabilities: Sequence[str] = (),
) -> Iterator[Path]:
    """``count`` simulated devices served on 127.0.0.1 while the block runs,
    and the inventory file that names them; ``actions`` and ``capabilities``
    as :class:`~mayfly.devices.sim.Simulator` takes them.

    Raises:
        ValueError: an action or capability the simulator refuses, named.
    """
    from mayfly.devices.sim import Simulator, SimulatorServer

    sim = Simulator(
        count,
        reboot_time=0.5,
        download_time=1.0,
        actions=dict(actions or {}),
        capabilities=capabilities,
    )
    server = SimulatorServer(sim).start()
    try:
        path = folder / "inventory.json"
        path.write_bytes(server.inventory().to_json())
        yield path
    finally:
        server.stop()


def dev_run(
    settings: Settings,
    folder: Path,
    inventory: Path,
    *,
    devices: Sequence[str] = (),
    selector: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> Outcome:
    """Build, check and run ``folder`` on ``devices`` (or those ``selector``
    matches) of ``inventory``; the outcome. ``say`` is told what the build
    checked, a line each.

    Raises:
        MayflyError: the folder does not build or check (its reason, file and
            line), or the run cannot start.
    """
    built = build_package(folder, wheel_cache=settings.wheel_cache)
    found = [*built.found, probe_built(built)]
    if say is not None:
        for line in found:
            say(line)
    home = Path(tempfile.mkdtemp(prefix="mayfly-dev-"))
    try:
        dev = Settings.from_env(
            {
                "MAYFLY_HOME": str(home),
                "MAYFLY_INVENTORY": str(inventory),
                "MAYFLY_MAX_PROCESSES": str(settings.max_processes),
            }
        )
        key = ensure_signing_key(dev)  # a throwaway key, trusted by the throwaway home only
        repo = open_repository(dev)
        repo.publish(built, sign_built(load_private_key(key), built))
        manifest = built.manifest
        coordinator = build_coordinator(dev, DEV_MODE)
        request = new_request(
            manifest.name,
            devices=devices,
            selector=selector,
            params=params,
            version=manifest.version,
            source="mayfly-pkg-run",
        )
        handled = coordinator.handle(request)
    finally:
        remove_tree(home)  # the package cache in it is read-only
    if isinstance(handled, Sharded | Deferred):  # neither: no shard sink, no schedule
        raise AssertionError(f"a development run was {type(handled).__name__}")
    return handled
