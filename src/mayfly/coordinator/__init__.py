"""The coordinator: one short-lived instance per task request."""

from __future__ import annotations

from mayfly.coordinator.core import Coordinator, CoordinatorOptions, overall_status
from mayfly.coordinator.pipeline import Handled, RequestPipeline, exit_code_for, summarize
from mayfly.exitcodes import ExitCode

__all__ = [
    "Coordinator",
    "CoordinatorOptions",
    "ExitCode",
    "Handled",
    "RequestPipeline",
    "exit_code_for",
    "overall_status",
    "summarize",
]
