"""Job mode: ``python -m mayfly.coordinator`` runs one request and exits.

An entry point, like the functions: it hands over to the composition root.
"""

from __future__ import annotations

import sys

from mayfly.app.job import run_job

if __name__ == "__main__":
    sys.exit(run_job())
