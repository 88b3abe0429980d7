"""The wire between a coordinator and its task processes: bounded JSON frames.

Task code runs in the task process and can write anything to its end of the
channel, so the coordinator treats every byte from it as hostile: a frame is
a 4-byte big-endian length and a JSON object of at most
:data:`MAX_FRAME_BYTES`, decoded with :func:`json.loads` (no pickle, nothing
that can run code) and checked field by field against the few shapes a task
process may send. Anything else is a :class:`ProtocolError`, and the
coordinator kills the process and fails its attempt.

Frames a task process sends::

    {"t": "ready"}
    {"t": "import_failed", "error": str}
    {"t": "progress", "percent": number, "message": str}
    {"t": "log", "level": "debug" | "info" | "warning" | "error" | "critical", "message": str}
    {"t": "done", "ok": bool, "output": str | null, "error": str | null}
    {"t": "call", "op": "state"}
    {"t": "call", "op": "action", "name": str, "payload": object}

Frames the coordinator sends (trusted; the task process still checks them)::

    {"t": "run", "device": {...}, "attempt": int, "remaining_s": number}
    {"t": "answer", "ok": true, "value": object}
    {"t": "answer", "ok": false, "kind": "unavailable" | "refused", "reason": str}
    {"t": "stop"}

No frame a task process sends names a device: ``done``, ``progress``, ``log``
and ``call`` are about the attempt the coordinator gave that process, so a package
can neither speak for nor reach another device. A ``call`` is the package's
only way to a device: the coordinator performs it on the attempt's device
and sends the ``answer`` (see :mod:`mayfly.coordinator.devicecalls`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

from mayfly.errors import EventError
from mayfly.jsondepth import check_depth

__all__ = [
    "LOG_LEVELS",
    "MAX_ACTION_NAME",
    "MAX_DEPTH",
    "MAX_FRAME_BYTES",
    "MAX_TEXT_CHARS",
    "Channel",
    "ProtocolError",
    "check_task_frame",
    "encode",
]

#: Largest frame either side accepts: a device's output (64 KiB of JSON) and
#: an error text, escaped, with room to spare.
MAX_FRAME_BYTES = 256 * 1024
#: Frames read in one go before the coordinator looks at its clocks again, so
#: a process flooding its channel cannot keep its attempt past the deadline.
MAX_FRAMES_PER_READ = 64
_HEADER = struct.Struct(">I")
_MAX_TEXT = 4096
#: Longest text (an error, a log line) a frame keeps; the rest is cut.
MAX_TEXT_CHARS = _MAX_TEXT
#: Nesting a frame may have: an action's payload sits two levels down.
MAX_DEPTH = 16
#: Longest action name a call may carry.
MAX_ACTION_NAME = 128
_READ_BYTES = 64 * 1024
#: The levels a package's ``ctx.log`` lines may have, as a ``log`` frame names them.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ProtocolError(Exception):
    """Raised when a peer sends bytes that are not a valid frame."""


def encode(frame: Mapping[str, Any]) -> bytes:
    body = json.dumps(frame, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def _text(frame: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = frame.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{frame.get('t')!r} frame: {key!r} must be a string")
    return value


def check_task_frame(frame: object) -> dict[str, Any]:
    """A frame from a task process, validated; raises :class:`ProtocolError`."""
    if not isinstance(frame, dict):
        raise ProtocolError("a frame must be a JSON object")
    kind = frame.get("t")
    if kind == "ready" and len(frame) == 1:
        return frame
    if kind == "import_failed" and set(frame) == {"t", "error"}:
        _text(frame, "error")
        return frame
    if kind == "progress" and set(frame) == {"t", "percent", "message"}:
        percent = frame["percent"]
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ProtocolError("progress frame: 'percent' must be a number")
        if not math.isfinite(percent):
            raise ProtocolError("progress frame: 'percent' must be finite")
        message = _text(frame, "message") or ""
        return {"t": "progress", "percent": min(100.0, max(0.0, float(percent))),
                "message": message[:200]}  # fmt: skip
    if kind == "log" and set(frame) == {"t", "level", "message"}:
        if frame["level"] not in LOG_LEVELS:
            raise ProtocolError(f"log frame: 'level' must be one of {', '.join(LOG_LEVELS)}")
        message = _text(frame, "message") or ""
        return {"t": "log", "level": frame["level"], "message": message[:_MAX_TEXT]}
    if kind == "done" and set(frame) == {"t", "ok", "output", "error"}:
        if not isinstance(frame["ok"], bool):
            raise ProtocolError("done frame: 'ok' must be true or false")
        output = _text(frame, "output", optional=True)
        error = _text(frame, "error", optional=True)
        if frame["ok"] and output is None:
            raise ProtocolError("done frame: a success carries its output")
        if error is not None:
            frame["error"] = error[:_MAX_TEXT]
        return frame
    if kind == "call":
        return _check_call(frame)
    raise ProtocolError(f"unexpected frame {str(kind)[:40]!r} with keys {sorted(frame)[:8]}")


def _check_call(frame: dict[str, Any]) -> dict[str, Any]:
    op = frame.get("op")
    if op == "state" and len(frame) == 2:
        return frame
    if op == "action" and set(frame) == {"t", "op", "name", "payload"}:
        name = _text(frame, "name") or ""
        if not 0 < len(name) <= MAX_ACTION_NAME or not name.isprintable():
            raise ProtocolError(
                f"call frame: an action name is 1 to {MAX_ACTION_NAME} printable characters"
            )
        if not isinstance(frame["payload"], dict):
            raise ProtocolError("call frame: 'payload' must be an object")
        return frame
    raise ProtocolError(f"call frame: unknown operation {str(op)[:40]!r} or keys")


class Channel:
    """One end of a stream socket carrying frames, with a bounded read buffer.

    The coordinator's end is non-blocking: :meth:`read` returns the complete
    frames that have arrived (at most :data:`MAX_FRAMES_PER_READ`) and keeps a
    partial one for later. The task process's end blocks.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def send(self, frame: Mapping[str, Any]) -> None:
        self.write(encode(frame))

    def write(self, encoded: bytes) -> None:
        """Send a frame :func:`encode` made."""
        data = memoryview(encoded)
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def read(self) -> list[object]:
        """Decoded frames now available (not yet validated).

        Raises:
            EOFError: the other end closed, with no partial frame pending.
            ProtocolError: an oversized or undecodable frame.
        """
        try:
            # 64 KiB at a time: os.read allocates what it is asked for, on every read.
            chunk = os.read(self.fd, _READ_BYTES)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            self.closed = True
        elif chunk:
            self._buffer += chunk
        frames: list[object] = []
        while len(frames) < MAX_FRAMES_PER_READ:
            frame = self._next()
            if frame is None:
                break
            frames.append(frame)
        if not frames and self.closed:
            raise EOFError("the other end closed the channel")
        return frames

    def pending(self) -> bool:
        """Whether a complete frame is already buffered."""
        if len(self._buffer) < _HEADER.size:
            return False
        size: int = _HEADER.unpack_from(self._buffer)[0]
        return len(self._buffer) >= _HEADER.size + size

    def _next(self) -> object | None:
        if len(self._buffer) < _HEADER.size:
            return None
        size: int = _HEADER.unpack_from(self._buffer)[0]
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        end = _HEADER.size + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        try:
            # Frames are flat objects: a deeply nested one is refused before
            # json recurses into it.
            check_depth(body, MAX_DEPTH, "frame")
            frame: object = json.loads(body)
        except EventError as exc:
            raise ProtocolError("frame nests too deeply") from exc
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"frame is not JSON: {str(exc)[:80]}") from exc
        return frame

    def read_blocking(self) -> object:
        """The next frame, waiting for it (the task process's side)."""
        while True:
            frame = self._next()
            if frame is not None:
                return frame
            chunk = os.read(self.fd, _READ_BYTES)
            if not chunk:
                raise EOFError("the coordinator closed the channel")
            self._buffer += chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
