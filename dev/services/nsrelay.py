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

- ``routes``: any other pair, ``{"listen": "host"|"inner", "bind": "ADDR:PORT",
  "dial": "ADDR:PORT"}``, dialled in the other namespace (the `cluster` service's pods reach
  the host's Kafka at the node's address, and tests reach its ingress at the host's
  loopback).

SPEC.json: ``{"netns": NAME, "into": [PORT...], "out": [PORT...], "routes": [...],
"pids": FILE, "children": [{"name": N, "argv": [...], "env": {...}, "log": FILE,
"once": BOOL, "after": "ADDR:PORT"}...]}``. A child marked ``once`` is a step that ends:
exiting 0 is its success; any other child's exit, or a ``once`` child's failure, stops them
all. A child with ``after`` starts once that address accepts connections inside the
namespace (a server it needs, started before it), or not at all after `AFTER_TIMEOUT_S`.
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
AFTER_TIMEOUT_S = 120.0

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


Address = tuple[str, int]


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _serve(accepted: socket.socket, dial: Address, dial_ns: int) -> None:
    try:
        enter(dial_ns)
        upstream = socket.create_connection(dial, timeout=10)
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


def _listen(
    bind: Address, dial: Address, listen_ns: int, dial_ns: int, ready: Callable[[str | None], None]
) -> None:
    port = bind[1]
    try:
        enter(listen_ns)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(bind)
        listener.listen(64)
    except OSError as exc:
        ready(f"{bind[0]}:{port}: {exc}")
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
            threading.Thread(target=_serve, args=(accepted, dial, dial_ns), daemon=True).start()
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

    relays = [((HOST, int(p)), (HOST, int(p)), host_ns, inner_ns) for p in spec.get("into", [])]
    relays += [((HOST, int(p)), (HOST, int(p)), inner_ns, host_ns) for p in spec.get("out", [])]
    for route in spec.get("routes", []):
        namespaces = (host_ns, inner_ns) if route["listen"] == "host" else (inner_ns, host_ns)
        relays.append((_address(route["bind"]), _address(route["dial"]), *namespaces))
    for bind, dial, listen_ns, dial_ns in relays:
        threading.Thread(
            target=_listen, args=(bind, dial, listen_ns, dial_ns, ready), daemon=True
        ).start()
    for _ in relays:
        done.acquire()
    if problems:
        raise OSError("cannot listen: " + "; ".join(problems))


def _wait_for(address: Address, netns_fd: int, stopping: threading.Event) -> bool:
    """Whether ``address`` accepted a connection, made inside the namespace, in time."""
    answered = threading.Event()

    def dial() -> None:
        enter(netns_fd)
        deadline = time.monotonic() + AFTER_TIMEOUT_S
        while time.monotonic() < deadline and not stopping.is_set():
            try:
                socket.create_connection(address, timeout=1).close()
            except OSError:
                time.sleep(0.2)
                continue
            answered.set()
            return

    waiter = threading.Thread(target=dial, daemon=True)
    waiter.start()
    waiter.join()
    return answered.is_set()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    netns = Path("/run/netns") / spec["netns"]
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    inner_ns = os.open(netns, os.O_RDONLY)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    _start_relays(spec, host_ns, inner_ns)
    print(
        f"nsrelay: relaying into {spec.get('into', [])}, out of {spec.get('out', [])} "
        f"and {len(spec.get('routes', []))} more routes ({netns})",
        flush=True,
    )

    children: dict[str, subprocess.Popen[bytes]] = {}
    logs = {child["name"]: Path(child["log"]) for child in spec["children"]}
    for child in spec["children"]:
        if stopping.is_set():
            break
        if child.get("after") and not _wait_for(_address(child["after"]), inner_ns, stopping):
            print(f"nsrelay: {child['after']} never answered: not starting {child['name']}")
            stopping.set()
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
    once = {child["name"] for child in spec["children"] if child.get("once")}
    while not stopping.wait(0.2):
        exited = {
            n: c.returncode
            for n, c in children.items()
            if c.poll() is not None and not (n in once and c.returncode == 0)
        }
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
