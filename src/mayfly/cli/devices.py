"""``mayfly devices``: work with device fleets; for now, simulate one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mayfly.devices.sim import Simulator, serve_until_signalled
from mayfly.errors import EventError, InventoryError
from mayfly.jsondepth import check_depth

__all__ = ["declarations", "devices", "read_declarations"]

if TYPE_CHECKING:
    # Click 8.2+ types ParamType as generic; older versions are not subscriptable at run time.
    _BrokenBase = click.ParamType[float | tuple[str, ...], object]
else:
    _BrokenBase = click.ParamType


class _Broken(_BrokenBase):
    """``--broken``: a fraction in 0..1, or comma-separated device ids."""

    name = "FRACTION|IDS"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | tuple[str, ...]:
        if isinstance(value, float | tuple):
            return value
        text = str(value).strip()
        try:
            fraction = float(text)
        except ValueError:
            ids = tuple(part.strip() for part in text.split(",") if part.strip())
            if not ids:
                self.fail("give a fraction in 0..1 or comma-separated device ids", param, ctx)
            return ids
        if not 0.0 <= fraction <= 1.0:
            self.fail(f"{text} is not a fraction in 0..1", param, ctx)
        return fraction


#: Largest file of declared actions and capabilities read.
_MAX_DECLARATIONS_BYTES = 1024 * 1024
#: Deepest a declared answer template nests (the parser's own limit is far off
#: only in bytes: 50,000 brackets overflow it).
_MAX_TEMPLATE_DEPTH = 32


def _parsed(raw: bytes | str, what: str, hint: str) -> Any:
    """JSON text of a declaration, its depth checked before it is parsed."""
    try:
        check_depth(raw, _MAX_TEMPLATE_DEPTH + 2, hint)
        return json.loads(raw)
    except (ValueError, EventError) as exc:
        raise click.BadParameter(f"{what}: {exc}", param_hint=hint) from exc


def read_declarations(path: Path | None) -> tuple[dict[str, Any], list[str]]:
    """The actions and capabilities a declarations file gives: ``{"actions":
    {NAME: ANSWER_TEMPLATE}, "capabilities": [NAME]}`` (both optional)."""
    if path is None:
        return {}, []
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_DECLARATIONS_BYTES + 1)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--declare") from exc
    if len(raw) > _MAX_DECLARATIONS_BYTES:
        raise click.BadParameter(f"{path}: over 1 MiB", param_hint="--declare")
    doc = _parsed(raw, str(path), "--declare")
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path}: expected a JSON object", param_hint="--declare")
    unknown = sorted(set(doc) - {"actions", "capabilities"})
    if unknown:
        raise click.BadParameter(
            f"{path}: unknown key(s) {', '.join(unknown)} (known: actions, capabilities)",
            param_hint="--declare",
        )
    actions, caps = doc.get("actions", {}), doc.get("capabilities", [])
    if not isinstance(actions, dict) or not isinstance(caps, list):
        raise click.BadParameter(
            f"{path}: actions is an object, capabilities a list", param_hint="--declare"
        )
    return actions, caps


def declarations(
    path: Path | None, actions: tuple[str, ...], capabilities: tuple[str, ...]
) -> tuple[dict[str, Any], list[str]]:
    """What ``--declare FILE``, ``--action NAME[=TEMPLATE]`` and ``--capability``
    declare together (the flags after the file)."""
    declared, caps = read_declarations(path)
    for item in actions:
        name, eq, template = item.partition("=")
        declared[name] = (
            _parsed(template, f"{item[:80]!r}", "--action")
            if eq
            else {"action": "{action}", "ok": True}
        )
    return declared, [*caps, *capabilities]


_DECLARE_OPTIONS = (
    click.option(
        "--declare",
        "declare_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help='More actions and capabilities from a JSON file: {"actions": {"blink": '
        '{"blinked": "$payload"}}, "capabilities": ["led"]}.',
    ),
    click.option(
        "--action",
        "actions",
        multiple=True,
        help="Another action every device understands, NAME or NAME=TEMPLATE: a JSON "
        'object answered ({device_id} and {action} filled in, "$payload" the body); '
        "applied ones are in the device's log.",
    ),
    click.option(
        "--capability",
        "capabilities",
        multiple=True,
        help="Another capability every device advertises (repeatable).",
    ),
)


def declare_options(fn: Any) -> Any:
    """The flags that declare a simulator's extra actions and capabilities."""
    for decorate in reversed(_DECLARE_OPTIONS):
        fn = decorate(fn)
    return fn


@click.group()
def devices() -> None:
    """Work with device fleets.

    \b
      mayfly devices simulate --count 100     # a fleet on loopback + inventory.json
    """


@devices.command()
@click.option(
    "--count",
    type=click.IntRange(min=1),
    required=True,
    help="Number of devices, ids sim-0001, sim-0002, ...",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=9100,
    show_default=True,
    help="Port on 127.0.0.1 to serve on; 0 picks a free one.",
)
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("inventory.json"),
    show_default=True,
    help="Where to write the inventory of the simulated devices.",
)
@click.option(
    "--reboot-time",
    type=click.FloatRange(min=0),
    default=0.3,
    show_default=True,
    help="Seconds a device is unavailable (503) after a reboot.",
)
@click.option(
    "--download-time",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Seconds a firmware download takes (progress 0..100).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Delay added to every device request.",
)
@click.option(
    "--jitter-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Random extra delay, 0..JITTER, per device request.",
)
@click.option(
    "--failure-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Fraction of device requests answered 503 before anything is done.",
)
@click.option(
    "--broken",
    type=_Broken(),
    default="0",
    show_default=True,
    help="Devices that answer 500 to every action (their state still answers): "
    "a fraction chosen by --seed, or comma-separated ids. Labels do not tell.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Makes failures, jitter and the broken set reproducible.",
)
@declare_options
def simulate(
    count: int,
    port: int,
    inventory_path: Path,
    reboot_time: float,
    download_time: float,
    latency_ms: float,
    jitter_ms: float,
    failure_rate: float,
    broken: float | tuple[str, ...],
    seed: int,
    declare_file: Path | None,
    actions: tuple[str, ...],
    capabilities: tuple[str, ...],
) -> None:
    """Serve --count simulated devices on 127.0.0.1 until Ctrl-C or SIGTERM.

    Writes an inventory whose addresses point at the devices, so a task run
    can target them. Each device has labels site (lab-a/b/c), model (m1/m2)
    and ring (canary for the first 5 %, else main) and runs firmware 1.0.0.

    \b
    Device protocol:
      GET  /devices/{id}/state                 200 state; 503 while rebooting
      POST /devices/{id}/actions/{name}        JSON body, Idempotency-Key header
           reboot                              unavailable for --reboot-time
           firmware-download {"version"}       202; staged after --download-time
           firmware-install  {"version"}       409 unless staged; active after reboot
           config-push {"config", "mode"}      mode merge (default) or replace
      NAME (--action, --declare)          200 with its answer template
      A repeated Idempotency-Key replays the first answer and applies nothing.

    \b
    Admin (what really happened):
      GET  /_sim/summary                       counters, firmware versions running
      GET  /_sim/devices/{id}                  state, applied log, arrivals per key
      GET  /_sim/log                           every device's applied log
      GET  /_sim/duplicates                    keys applied twice (always empty)
      POST /_sim/reset                         every device back to its first boot
    """
    extra, caps = declarations(declare_file, actions, capabilities)
    try:
        sim = Simulator(
            count,
            port=port,
            reboot_time=reboot_time,
            download_time=download_time,
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            failure_rate=failure_rate,
            broken=broken,
            seed=seed,
            actions=extra,
            capabilities=caps,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc

    def ready(bound: int) -> None:
        try:
            inventory_path.write_bytes(sim.inventory().to_json())
        except OSError as exc:
            raise InventoryError(f"cannot write {inventory_path}: {exc.strerror}") from exc
        click.echo(f"serving    {count} devices at http://127.0.0.1:{bound}/devices/<id>")
        click.echo(f"inventory  {inventory_path}")
        click.echo(f"summary    http://127.0.0.1:{bound}/_sim/summary")
        if sim.broken_ids:
            click.echo(f"broken     {len(sim.broken_ids)} device(s), see the summary")
        click.echo("press Ctrl-C to stop", err=True)

    try:
        asyncio.run(serve_until_signalled(sim, port, ready=ready))
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on 127.0.0.1:{port}: {exc.strerror or exc}; "
            "choose another --port (0 picks a free one)"
        ) from exc
    done = sim.summary()
    click.echo(
        f"stopped after {done['requests']} requests: {done['applied']} applied, "
        f"{done['replayed']} replayed, {done['injected_failures']} injected failures"
    )
