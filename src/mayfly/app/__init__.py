"""The composition root: the one place that chooses and wires implementations.

Everything below it (the event contract, packages, devices, the coordinator,
the runtime's machinery, the aggregator) takes its collaborators as
arguments and imports no adapter it does not define; this package reads
:class:`~mayfly.settings.Settings` and builds the whole for each way Mayfly
runs:

- :mod:`~mayfly.app.wiring`: which implementation backs each port (event log,
  package store, archive, result sink, devices) and the coordinator and
  aggregator built from them;
- :mod:`~mayfly.app.job`: job mode (``python -m mayfly.coordinator``);
- :mod:`~mayfly.app.functions`: the Knative functions' instances;
- :mod:`~mayfly.app.local`: the local runtime (``mayfly up``);
- :mod:`~mayfly.app.demo`: ``mayfly demo``;
- :mod:`~mayfly.app.publishing`: package folders published into a home.

``make lint`` checks the layering (``lint-imports``, contracts in pyproject.toml).
"""
