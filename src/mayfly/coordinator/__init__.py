"""The coordinator: one short-lived instance per task request.

Its names are imported on first use: a task process imports
:mod:`mayfly.coordinator.worker` without the coordinator's own dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mayfly._lazy import exports
from mayfly.exitcodes import ExitCode

if TYPE_CHECKING:
    from mayfly.coordinator.core import Coordinator, CoordinatorOptions, overall_status
    from mayfly.coordinator.pipeline import (
        Handled,
        RequestPipeline,
        exit_code_for,
        summarize,
    )
else:
    __getattr__, __dir__ = exports(
        __name__,
        {
            "Coordinator": "mayfly.coordinator.core",
            "CoordinatorOptions": "mayfly.coordinator.core",
            "overall_status": "mayfly.coordinator.core",
            "Handled": "mayfly.coordinator.pipeline",
            "RequestPipeline": "mayfly.coordinator.pipeline",
            "exit_code_for": "mayfly.coordinator.pipeline",
            "summarize": "mayfly.coordinator.pipeline",
        },
    )

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
