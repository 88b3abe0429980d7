"""The two Kafka requests the Kafka probe makes, spoken over a plain socket.

Wire format: every message is an int32 size then the bytes. Request header v1: int16
api_key, int16 api_version, int32 correlation_id, int16-length client_id. Response header
v0: the int32 correlation_id. All integers big-endian.
"""

from __future__ import annotations

import socket
import struct

_CLIENT_ID = b"mayfly-services"


def api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """ApiVersions v0 (key 18, empty body): {api_key: (min_version, max_version)}.

    Response v0: int16 error_code, then an int32-counted array of (int16 api_key,
    int16 min_version, int16 max_version). Kafka 4 still serves v0 of this one request so
    that any client can discover the rest.
    """
    response = _call(sock, 18, 0, b"")
    error, count = struct.unpack_from(">hi", response)
    if error:
        raise ValueError(f"ApiVersions error code {error}")
    entries = (struct.unpack_from(">hhh", response, 6 + 6 * i) for i in range(count))
    return {key: (low, high) for key, low, high in entries}


def metadata_brokers(sock: socket.socket) -> list[int]:
    """Metadata v4 (key 3) for no topics: the node ids of the live (unfenced) brokers.

    Request v4: an int32-counted topic array (0 entries) and a boolean
    allow_auto_topic_creation. Response v4 starts with int32 throttle_time_ms and an
    int32-counted array of (int32 node_id, int16-length host, int32 port, nullable rack).
    """
    response = _call(sock, 3, 4, struct.pack(">ib", 0, 0))
    _throttle, count = struct.unpack_from(">ii", response)
    offset, nodes = 8, []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", response, offset)
        offset += 6 + host_len + 4  # host bytes, int32 port
        (rack_len,) = struct.unpack_from(">h", response, offset)
        offset += 2 + max(rack_len, 0)
        nodes.append(node_id)
    return nodes


def _call(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    """Send one request with a v1 (non-flexible) header; return the response after its header."""
    correlation_id = api_key  # one request per key per connection: unique enough
    header = struct.pack(">hhih", api_key, version, correlation_id, len(_CLIENT_ID))
    message = header + _CLIENT_ID + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got,) = struct.unpack_from(">i", response)
    if got != correlation_id:
        raise ValueError(f"response to correlation id {got}, expected {correlation_id}")
    return response[4:]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
