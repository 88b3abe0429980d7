"""The aggregator's in-memory telemetry, to compare the view's trace ids with real spans."""

from tests.aggregator.conftest import archive_dir, telemetered

__all__ = ["archive_dir", "telemetered"]
