"""Job mode: ``python -m mayfly.coordinator`` runs one request and exits."""

from __future__ import annotations

import sys

from mayfly.coordinator.entry import run_job

if __name__ == "__main__":
    sys.exit(run_job())
