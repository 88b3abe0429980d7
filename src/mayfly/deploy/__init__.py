"""Deploying Mayfly on Knative: render a task type's resources, apply them to a cluster.

``render`` is pure (manifest in, objects out); ``kube`` talks to the API server and
is imported on its own (``from mayfly.deploy.kube import open_cluster``): the
kubernetes client takes most of a second to import, which no other command should pay.
"""

from __future__ import annotations

from mayfly.deploy.render import (
    DEFAULT_IMAGE,
    DeployOptions,
    Resource,
    describe,
    kn_command,
    render_task,
    service_timeout_s,
    shape_of,
)

__all__ = [
    "DEFAULT_IMAGE",
    "DeployOptions",
    "Resource",
    "describe",
    "kn_command",
    "render_task",
    "service_timeout_s",
    "shape_of",
]
