"""Job mode wired: ``python -m mayfly.coordinator`` runs one request and exits.

The request comes from the environment or a CloudEvent file
(:mod:`mayfly.coordinator.job` says which variables); settings, the result
sink and the coordinator come from :class:`~mayfly.settings.Settings`. The
exit status is the request's :class:`~mayfly.exitcodes.ExitCode`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

from mayfly.app.wiring import build_coordinator, open_sink
from mayfly.coordinator import Coordinator, RequestPipeline, summarize
from mayfly.coordinator.job import event_from_env, process_start, request_attributes
from mayfly.errors import MayflyError
from mayfly.exitcodes import ExitCode
from mayfly.settings import Settings

__all__ = ["run_job"]


def run_job(env: Mapping[str, str] | None = None) -> int:
    """Run one request, deliver the outcome, return the exit code."""
    env = os.environ if env is None else env
    received_at = process_start()
    try:
        settings = Settings.from_env(env)
        sink = open_sink(settings)
        coordinator = build_coordinator(settings, "job")
    except MayflyError as exc:
        print(f"mayfly coordinator: {exc}", file=sys.stderr)
        return ExitCode.CONFIG

    def on_start(running: Coordinator) -> None:
        # SIGTERM (Job deletion, pod eviction) cancels cleanly: the devices
        # still running end "canceled" and the result is still delivered.
        signal.signal(signal.SIGTERM, lambda *_: running.cancel())

    try:
        handled = RequestPipeline(lambda: coordinator, sink).handle(
            lambda: event_from_env(env),
            lambda: request_attributes(env),
            received_at=received_at,
            on_start=on_start,
        )
    finally:
        sink.close()
    if handled.error is not None:
        print(f"mayfly coordinator: {handled.error}", file=sys.stderr)
    elif handled.outcome is None:
        print("mayfly coordinator: the event is not a request; nothing to run", file=sys.stderr)
    else:
        print(f"mayfly coordinator: {summarize(handled.outcome)}", file=sys.stderr)
    return int(handled.code)
