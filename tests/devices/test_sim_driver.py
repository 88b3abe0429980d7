"""SimulatorDriver on its own: how it is built and where it refuses to work.

What it does with devices is the driver contract, in test_driver_contract.py.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection

import pytest

from mayfly.devices import DeviceDriver
from mayfly.devices.sim import Simulator, SimulatorDriver

_FORK = multiprocessing.get_context("fork")


def test_factory_makes_drivers_the_coordinator_way() -> None:
    sim = Simulator(2)
    factory: Callable[[], DeviceDriver] = SimulatorDriver.factory(sim, retries=0)

    first, second = factory(), factory()

    assert isinstance(first, SimulatorDriver)
    assert first is not second
    assert first.simulator is second.simulator is sim
    device = sim.inventory("sim://embedded").get("sim-0002")
    assert device is not None
    assert first.state(device)["id"] == "sim-0002"
    first.close()
    first.close()


@pytest.mark.parametrize("options", [{"retries": -1}, {"pool_size": 0}])
def test_factory_checks_its_options_at_once(options: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="retries must be >= 0 and pool_size >= 1"):
        SimulatorDriver.factory(Simulator(1), **options)


def _state_in_child(factory: Callable[[], DeviceDriver], sim: Simulator, conn: Connection) -> None:
    device = sim.inventory("sim://embedded").get("sim-0001")
    assert device is not None
    try:
        factory().state(device)
    except RuntimeError as exc:
        conn.send(("RuntimeError", str(exc)))
    else:
        conn.send(("answered", ""))
    conn.close()


def test_a_forked_process_is_refused_rather_than_acting_on_a_copy() -> None:
    # The coordinator calls driver_factory in forked task processes: each would
    # hold its own copy of the fleet, so the driver must say so, not diverge.
    sim = Simulator(1)
    factory = SimulatorDriver.factory(sim)
    parent, child = _FORK.Pipe()
    process = _FORK.Process(target=_state_in_child, args=(factory, sim, child))
    process.start()
    child.close()
    try:
        assert parent.poll(20), "the child did not report"
        outcome, message = parent.recv()
    finally:
        process.join(20)
        parent.close()

    assert outcome == "RuntimeError"
    assert "forked process" in message
    assert "SimulatorServer and use HttpDriver" in message
