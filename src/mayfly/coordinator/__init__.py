"""The coordinator: one short-lived instance per task request."""

from __future__ import annotations

from mayfly.coordinator.core import Coordinator, CoordinatorOptions, overall_status
from mayfly.coordinator.entry import ExitCode, build_coordinator, handle_http, run_job
from mayfly.coordinator.runner import DeviceProgress

__all__ = [
    "Coordinator",
    "CoordinatorOptions",
    "DeviceProgress",
    "ExitCode",
    "build_coordinator",
    "handle_http",
    "overall_status",
    "run_job",
]
