"""A device simulator: N devices on loopback speaking the device protocol.

The demo's fleet, the tests' fleet and the benchmark target. :class:`Simulator`
holds the fleet (state machines, idempotency records, injected latency and
failures) and does no I/O; :class:`SimulatorServer` serves it over HTTP from a
background thread, :func:`serve_until_signalled` in the foreground (the
``mayfly devices simulate`` command). :class:`SimulatorDriver` is the embedded
``DeviceDriver``: ``HttpDriver`` with a transport that calls the same fleet
in-process instead of over HTTP.
"""

from __future__ import annotations

from mayfly.devices.sim.driver import SimulatorDriver
from mayfly.devices.sim.fleet import (
    ACTIONS,
    CAPABILITIES,
    INITIAL_FIRMWARE,
    SimResponse,
    Simulator,
    device_ids,
)
from mayfly.devices.sim.server import (
    HOST,
    SimulatorServer,
    make_app,
    serve_until_signalled,
    start_server,
)

__all__ = [
    "ACTIONS",
    "CAPABILITIES",
    "HOST",
    "INITIAL_FIRMWARE",
    "SimResponse",
    "Simulator",
    "SimulatorDriver",
    "SimulatorServer",
    "device_ids",
    "make_app",
    "serve_until_signalled",
    "start_server",
]
