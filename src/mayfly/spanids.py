"""Span and trace ids derived from a key, for spans that may be made twice.

The aggregator traces a result again when it cannot know whether the spans
it made before a crash were exported. Made under :func:`derived_ids` with the
request's identity, the second time's spans are the first time's: the same
trace id (when no publisher's trace is continued) and the same span ids, so
the request is still one trace and a backend that received both copies holds
the same span twice, not a second trace.

Tracers read :func:`next_id`; outside :func:`derived_ids` it is ``None`` and
they draw their ids as they always do. Library code uses only the context
manager; the SDK's id generator and Mayfly's record tracer consult it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["derived_ids", "next_id"]

_DERIVED: ContextVar[random.Random | None] = ContextVar("mayfly_derived_ids", default=None)


@contextlib.contextmanager
def derived_ids(key: str) -> Iterator[None]:
    """Within the block, ids come from a generator seeded by ``key``, in order."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big")
    # Ids need to be unique per key and repeatable, not secret.
    token = _DERIVED.set(random.Random(seed))  # noqa: S311
    try:
        yield
    finally:
        _DERIVED.reset(token)


def next_id(bits: int) -> int | None:
    """The next derived id of ``bits`` bits (never 0), or ``None`` outside :func:`derived_ids`."""
    derived = _DERIVED.get()
    if derived is None:
        return None
    return derived.getrandbits(bits) or 1
