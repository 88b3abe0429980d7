"""The coordinator tests' home and fleet, for the hostile packages."""

from __future__ import annotations

from ..coordinator.conftest import env, fleet

__all__ = ["env", "fleet"]
