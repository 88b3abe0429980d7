"""Servers run inside a private network namespace, reached through loopback relays.

``python -m services.nsrelay SPEC.json`` (with dev/ on ``sys.path``) is the process a
service such as `knative` runs: it starts the spec's children inside the network namespace
``/run/netns/NAME`` (with ``nsenter``), relays TCP between the host's 127.0.0.1 and the
namespace's, and stops the children when it is stopped or when one of them exits.

Why a namespace: Knative's webhooks listen on every interface (``:PORT``, no bind address
to give), and nothing here may listen beyond loopback. Inside a namespace that has only its
own ``lo``, "every interface" is that ``lo``; the relays are the only way in or out:

- ``into``: a port listened on at the host's 127.0.0.1, relayed to the same port inside
  (the API server calls the webhooks there);
- ``out``: a port listened on at the namespace's 127.0.0.1, relayed to the same port on the
  host (the webhooks reach the API server).

A socket belongs to the network namespace its thread was in when it was made, so each
listener's and each dial's thread first enters the namespace it needs (``setns``).

SPEC.json: ``{"netns": NAME, "into": [PORT...], "out": [PORT...], "pids": FILE,
"children": [{"name": N, "argv": [...], "env": {...}, "log": FILE}...]}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
HOST = "127.0.0.1"
_BUFFER = 256 * 1024
_STOP_GRACE_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def enter(netns_fd: int) -> None:
    """Move the calling thread (only it) into the network namespace open as ``netns_fd``."""
    if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(_BUFFER):
            sink.sendall(data)
    except OSError:
        # A reset or a failed write: end both directions, or the other pump could wait
        # for ever on a peer that never closes.
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        return
    # A clean end of stream: half-close, the other direction may still have bytes to carry.
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _serve(accepted: socket.socket, port: int, dial_ns: int) -> None:
    try:
        enter(dial_ns)
        upstream = socket.create_connection((HOST, port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        accepted.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, accepted), daemon=True)
    back.start()
    _pump(accepted, upstream)
    back.join()
    accepted.close()
    upstream.close()


def _listen(port: int, listen_ns: int, dial_ns: int, ready: Callable[[str | None], None]) -> None:
    try:
        enter(listen_ns)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(64)
    except OSError as exc:
        ready(f"port {port}: {exc}")
        return
    ready(None)
    while True:
        try:
            accepted, _ = listener.accept()
        except OSError as exc:  # e.g. out of file descriptors: keep the port served
            print(f"nsrelay: port {port}: accept: {exc}", flush=True)
            time.sleep(0.1)
            continue
        try:
            threading.Thread(target=_serve, args=(accepted, port, dial_ns), daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: refuse this one connection
            print(f"nsrelay: port {port}: {exc}", flush=True)
            accepted.close()


def _start_relays(spec: dict[str, Any], host_ns: int, inner_ns: int) -> None:
    problems: list[str] = []
    done = threading.Semaphore(0)

    def ready(problem: str | None) -> None:
        if problem:
            problems.append(problem)
        done.release()

    relays = [(int(p), host_ns, inner_ns) for p in spec.get("into", [])]
    relays += [(int(p), inner_ns, host_ns) for p in spec.get("out", [])]
    for port, listen_ns, dial_ns in relays:
        threading.Thread(
            target=_listen, args=(port, listen_ns, dial_ns, ready), daemon=True
        ).start()
    for _ in relays:
        done.acquire()
    if problems:
        raise OSError("cannot listen: " + "; ".join(problems))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    netns = Path("/run/netns") / spec["netns"]
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    inner_ns = os.open(netns, os.O_RDONLY)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    _start_relays(spec, host_ns, inner_ns)
    print(f"nsrelay: relaying into {spec['into']} and out of {spec['out']} ({netns})", flush=True)

    children: dict[str, subprocess.Popen[bytes]] = {}
    logs = {child["name"]: Path(child["log"]) for child in spec["children"]}
    for child in spec["children"]:
        if stopping.is_set():
            break
        with open(child["log"], "ab") as log:
            children[child["name"]] = subprocess.Popen(
                ["nsenter", f"--net={netns}", "--", *child["argv"]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child["env"],
                start_new_session=True,
            )
        print(f"nsrelay: started {child['name']} (pid {children[child['name']].pid})", flush=True)
        # As each starts: if this process is killed now, whoever cleans up knows them all.
        Path(spec["pids"]).write_text(json.dumps({n: c.pid for n, c in children.items()}))

    code = 0
    while not stopping.wait(0.2):
        exited = {n: c.returncode for n, c in children.items() if c.poll() is not None}
        if exited:
            for name, returncode in exited.items():
                tail = logs[name].read_text(errors="replace").splitlines()[-15:]
                print(f"nsrelay: {name} exited with code {returncode}; its log ends:", flush=True)
                print("\n".join(f"    {line[:400]}" for line in tail), flush=True)
            print("nsrelay: stopping the rest", flush=True)
            code = 1
            break
    for child_process in children.values():
        with contextlib.suppress(ProcessLookupError):
            child_process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for child_process in children.values():
        try:
            child_process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child_process.kill()
            child_process.wait()
    print("nsrelay: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
