"""Tracking published requests: what became of each, as the log tells it.

:mod:`~mayfly.tracking.view` folds the request lanes and the results topic
into one :class:`RequestView` per request (``mayfly get``, ``list``,
``publish --wait``); :mod:`~mayfly.tracking.outcomes` puts a result's parts
and shards back together. No I/O: the composition root reads the log.
"""

from mayfly.tracking.outcomes import Outcome, OutcomeCollector, root_of
from mayfly.tracking.view import RequestBook, RequestState, RequestView, trace_url

__all__ = [
    "Outcome",
    "OutcomeCollector",
    "RequestBook",
    "RequestState",
    "RequestView",
    "root_of",
    "trace_url",
]
