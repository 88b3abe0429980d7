"""How deep JSON text nests, told before it is parsed.

Its own module, with nothing but :mod:`mayfly.errors` under it: a task
process checks its calls' payloads with it and imports none of the event
models (:mod:`mayfly.coordinator.zygote`).
"""

from __future__ import annotations

import re

from mayfly.errors import EventError

__all__ = ["check_depth"]

# A JSON string, escapes included: the brackets inside one do not nest.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def check_depth(raw: bytes | str, limit: int, field: str = "data") -> None:
    """Refuse JSON text nested deeper than ``limit`` levels, before it is parsed.

    Cheap: text with at most ``limit`` brackets cannot be deeper (a normal
    request: two ``count`` calls). Otherwise the brackets outside strings are
    kept and innermost pairs removed, one level per pass, in C (``re``,
    ``bytes.translate``, ``bytes.replace``); a typical result needs as many
    passes as it is deep. Malformed text may be refused here rather than by
    the parser; it is refused either way.

    Raises:
        EventError: on ``field``, when the text is (or may be) nested too deeply.
    """
    if isinstance(raw, str):
        if raw.count("[") + raw.count("{") <= limit:
            return
        raw = raw.encode("utf-8", "surrogatepass")
    elif raw.count(b"[") + raw.count(b"{") <= limit:
        return
    skeleton = _JSON_STRING.sub(b"", raw).translate(_SQUARE, _NOT_BRACKETS)
    height = 0  # of the tallest balanced bracket tree removed so far
    while skeleton and height <= limit:
        reduced = skeleton.replace(b"[]", b"")
        if len(reduced) == len(skeleton):
            break  # unmatched brackets only: "]]][[["
        skeleton, height = reduced, height + 1
    # Unmatched opening brackets nest around whatever follows them.
    if height + skeleton.count(b"[") > limit:
        raise EventError(
            field, f"JSON nested more than {limit} levels deep; Mayfly accepts at most {limit}"
        )
