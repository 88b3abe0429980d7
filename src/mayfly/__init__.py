"""Mayfly: run actions against fleets of devices without a persistent coordinator."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
