"""The local runtime's machinery: dispatcher, its policies, warm-parent spawner, state.

The event log it reads is :mod:`mayfly.eventlog`; :mod:`mayfly.app.local`
wires the whole for ``mayfly up``.
"""

from __future__ import annotations
