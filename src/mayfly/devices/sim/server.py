"""The simulator on HTTP: one aiohttp server on loopback, every device under a prefix.

Device protocol (``{id}`` is a device id such as ``sim-0001``)::

    GET  /devices/{id}/state
    POST /devices/{id}/actions/{name}     JSON body, Idempotency-Key header

Admin endpoints, for tests and benchmarks to check what really happened::

    GET  /_sim/devices/{id}    state, applied log, arrivals per key
    GET  /_sim/summary         fleet-wide counters, firmware versions running
    GET  /_sim/log             every device's applied log
    GET  /_sim/duplicates      (device, key) applied twice: always empty
    POST /_sim/reset           every device back to its first boot

Handlers only decode, delay (latency injection) and encode; the fleet in
:mod:`mayfly.devices.sim.fleet` decides. No access log: at thousands of
requests per second it would cost more than the answers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from mayfly.devices.inventory import Inventory
from mayfly.devices.sim.fleet import SimResponse, Simulator

__all__ = ["HOST", "SimulatorServer", "make_app", "serve_until_signalled", "start_server"]

#: The only address the simulator listens on: it is a test fleet, not a service.
HOST = "127.0.0.1"
# Connections a benchmark opens at once can exceed the default backlog of 128.
_BACKLOG = 2048
# In-flight requests get this long to finish when the server stops.
_SHUTDOWN_TIMEOUT_S = 2.0


def _json(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers=dict(headers) if headers else None,
    )


def _respond(answer: SimResponse) -> web.Response:
    return _json(answer.status, answer.body, answer.headers)


class _Handlers:
    """Request handlers bound to one fleet (a closure is cheaper than an app lookup)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def _delay(self) -> None:
        delay = self.sim.delay()
        if delay > 0:
            await asyncio.sleep(delay)

    async def state(self, request: web.Request) -> web.Response:
        await self._delay()
        return _respond(self.sim.state(request.match_info["id"]))

    async def action(self, request: web.Request) -> web.Response:
        await self._delay()
        raw = await request.read()
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return _json(400, {"error": "body is not valid JSON"})
        answer = self.sim.action(
            request.match_info["id"],
            request.match_info["name"],
            payload,
            request.headers.get("Idempotency-Key"),
        )
        return _respond(answer)

    async def records(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        try:
            return _json(200, self.sim.records(device_id))
        except KeyError:
            return _json(404, {"error": f"unknown device {device_id}"})

    async def summary(self, request: web.Request) -> web.Response:
        return _json(200, self.sim.summary())

    async def log(self, request: web.Request) -> web.Response:
        return _json(200, self.sim.log())

    async def duplicates(self, request: web.Request) -> web.Response:
        return _json(200, self.sim.duplicates())

    async def reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return _json(200, {"reset": True, "devices": self.sim.count})


def make_app(sim: Simulator) -> web.Application:
    """An aiohttp application serving ``sim``'s devices and admin endpoints."""
    h = _Handlers(sim)
    app = web.Application()
    app.router.add_get("/devices/{id}/state", h.state, allow_head=False)
    app.router.add_post("/devices/{id}/actions/{name}", h.action)
    app.router.add_get("/_sim/devices/{id}", h.records, allow_head=False)
    app.router.add_get("/_sim/summary", h.summary, allow_head=False)
    app.router.add_get("/_sim/log", h.log, allow_head=False)
    app.router.add_get("/_sim/duplicates", h.duplicates, allow_head=False)
    app.router.add_post("/_sim/reset", h.reset)
    return app


async def start_server(sim: Simulator, port: int | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``sim`` on ``127.0.0.1:port`` (default ``sim.port``; 0 picks a free port).

    Returns the runner (``await runner.cleanup()`` stops it) and the bound
    port; ``sim.base_url`` is set, so ``sim.inventory()`` works.

    Raises:
        OSError: the port cannot be bound.
    """
    runner = web.AppRunner(make_app(sim), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, HOST, sim.port if port is None else port, backlog=_BACKLOG)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    sim.bind(f"http://{HOST}:{bound}")
    return runner, bound


async def serve_until_signalled(
    sim: Simulator, port: int | None = None, *, ready: Callable[[int], None] | None = None
) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly.

    ``ready(port)`` is called once the server listens; if it raises, the
    server stops and the exception propagates.
    """
    runner, bound = await start_server(sim, port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(bound)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        sim.bind(None)
        await runner.cleanup()


class SimulatorServer:
    """Runs a simulator's server in a background thread with its own event loop.

    ::

        with SimulatorServer(Simulator(100)) as server:
            inventory = server.inventory()
            requests.get(f"{server.url}/devices/sim-0001/state")

    Args:
        simulator: the fleet to serve.
        port: overrides ``simulator.port`` (0 picks a free port).
    """

    def __init__(self, simulator: Simulator, *, port: int | None = None) -> None:
        self.simulator = simulator
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def port(self) -> int:
        """The bound port. Raises RuntimeError before :meth:`start`."""
        if self._port is None:
            raise RuntimeError("the simulator server is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: devices are under ``/devices/{id}``."""
        return f"http://{HOST}:{self.port}"

    def inventory(self) -> Inventory:
        """The served fleet, addresses included."""
        return self.simulator.inventory(self.url)

    def start(self) -> SimulatorServer:
        """Bind and serve; returns once the port accepts connections.

        Raises:
            OSError: the port cannot be bound.
            RuntimeError: already started.
        """
        if self._thread is not None:
            raise RuntimeError("the simulator server is already running")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve(started))
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                started.set()
            finally:
                # Connection tasks aiohttp left behind would otherwise be destroyed
                # pending when the loop closes, which asyncio reports as an error.
                leftover = asyncio.all_tasks(loop)
                for task in leftover:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="mayfly-simulator", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    async def _serve(self, started: threading.Event) -> None:
        runner, self._port = await start_server(self.simulator, self._requested_port)
        self._stopped = asyncio.Event()
        started.set()
        try:
            await self._stopped.wait()
        finally:
            self.simulator.bind(None)
            await runner.cleanup()

    def stop(self) -> None:
        """Stop serving, close connections and the loop; a no-op when not running."""
        loop, thread, stopped = self._loop, self._thread, self._stopped
        if loop is None or thread is None:
            return
        if stopped is not None:
            loop.call_soon_threadsafe(stopped.set)
        thread.join()
        self._loop = self._thread = self._stopped = None
        self._port = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
