"""``mayfly demo``: the main job, the whole pipeline on one machine."""

from __future__ import annotations

from pathlib import Path

import click

from mayfly.settings import Settings

__all__ = ["demo"]


def _report(settings: Settings) -> None:
    from mayfly.cli.report import report

    ctx = report.make_context("report", ["--home", str(settings.home)])
    with ctx:
        report.invoke(ctx)


@click.command()
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    default=Path(".mayfly/demo"),
    show_default=True,
    help="Fresh Mayfly home for the run (emptied first).",
)
@click.option(
    "--devices",
    type=click.IntRange(10, 10_000),
    default=200,
    show_default=True,
    help="Simulated devices.",
)
@click.option(
    "--broken",
    type=click.FloatRange(0, 0.5),
    default=0.03,
    show_default=True,
    help="Fraction of devices that refuse every action.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(10, 3600),
    default=110.0,
    show_default=True,
    help="Give up (exit 1) after this many seconds.",
)
@click.option("--event-log", help="kafka://HOST:PORT to run on Kafka (default: embedded log).")
@click.option("--store", help="s3://BUCKET to keep packages in S3 (needs MAYFLY_S3_*).")
@click.option("--jaeger-url", help="Jaeger's UI, e.g. http://127.0.0.1:16686, to link a trace.")
def demo(
    home: Path,
    devices: int,
    broken: float,
    timeout: float,
    event_log: str | None,
    store: str | None,
    jaeger_url: str | None,
) -> None:
    """Run Mayfly end to end on this machine, with no server installed.

    Publishes the example packages, starts a simulated fleet and the local
    runtime, publishes a mix of requests on all three priority lanes, shows
    progress until every request is accounted for, prints the report, and
    says where the traces are (Jaeger when OTEL_EXPORTER_OTLP_ENDPOINT is set,
    else an OTLP-JSON file). Exits 0 only when every request is accounted for.
    """
    from mayfly.app.demo import DemoPlan, run_demo

    plan = DemoPlan(
        home=home.absolute(),
        devices=devices,
        broken=broken,
        timeout_s=timeout,
        event_log=event_log,
        store=store,
        jaeger_url=jaeger_url,
        echo=click.echo,
    )
    raise SystemExit(run_demo(plan, report=_report))
