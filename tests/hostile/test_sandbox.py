"""Malicious task packages (signed, by a trusted key): what they can no longer do.

Each package is published into a fresh home and run by a real coordinator
against a real simulated fleet; the package reports what it managed to do as
its output, and the test checks that and the world around it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mayfly.coordinator.zygote import TaskZygote
from mayfly.events import (
    MAX_DEVICE_LOG_LINES,
    MAX_LOG_MESSAGE,
    DeviceStatus,
    TaskCompleted,
    new_request,
    split_completed,
    to_kafka_record,
)
from mayfly.sandbox import landlock, seccomp

from ..coordinator.conftest import Env, FleetFactory, make_env, write_package

#: How the secrets of these tests begin (the rest is random, made per test).
MARKER = "s3-secret-"

# Without the kernel's layers these cannot hold; under CI=true they run and fail.
pytestmark = pytest.mark.skipif(
    (landlock.abi_version() < 6 or not seccomp.supported()) and os.environ.get("CI") != "true",
    reason="the kernel lacks Landlock ABI 6 or the seccomp filter's architecture",
)


@pytest.fixture(params=["forked", "zygote"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """Every package here runs in task processes forked from their coordinator
    (job mode) and again in ones the task zygote starts (the local runtime)."""
    e = make_env(tmp_path)
    if request.param == "forked":
        yield e
        return
    zygote = TaskZygote()
    zygote.start()
    e.starter = zygote
    try:
        yield e
    finally:
        zygote.stop()


def _manifest(name: str, **limits: object) -> dict[str, object]:
    return {
        "name": name,
        "version": "1.0.0",
        "entrypoint": "task:run",
        "limits": {"device_timeout_s": 10, "retries": 0, **limits},
    }


def _run(
    env: Env, tmp_path: Path, name: str, code: str, devices: list[str], **limits: object
) -> TaskCompleted:
    env.publish(write_package(tmp_path / name, _manifest(name, **limits), textwrap.dedent(code)))
    outcome = env.coordinator().handle(new_request(name, devices=devices))
    assert isinstance(outcome, TaskCompleted), outcome
    return outcome


def test_a_pickle_on_the_channel_runs_nothing_in_the_coordinator(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    sim = fleet(2, broken=["sim-0002"]).simulator
    marker = tmp_path / "ran-in-the-coordinator"
    code = f"""
        import os, pickle, struct

        class Exploit:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))

        def run(ctx):
            payload = pickle.dumps(Exploit())
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack("!i", len(payload)) + payload)
                except OSError:
                    pass
            return "wrote"
        """
    outcome = _run(env, tmp_path, "pickler", code, ["sim-0001", "sim-0002"])
    assert not marker.exists(), "a pickle sent by package code ran in the coordinator"
    by_id = {d.device_id: d for d in outcome.devices}
    assert by_id["sim-0001"].status is DeviceStatus.FAILED
    assert "broke protocol" in (by_id["sim-0001"].error or "")
    assert by_id["sim-0002"].status is not DeviceStatus.SUCCEEDED
    assert outcome.status != "succeeded"
    assert sim.records("sim-0002")["log"] == []


def test_a_forged_done_frame_cannot_speak_for_another_device(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(2, broken=["sim-0002"])
    code = """
        import json, os, struct

        def run(ctx):
            if ctx.device.id == "sim-0002":
                raise RuntimeError("this device is broken")
            frame = json.dumps({"t": "done", "ok": True, "output": '"forged"', "error": None,
                                "device": "sim-0002"}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack(">I", len(frame)) + frame)
                except OSError:
                    pass
            return "real"
        """
    outcome = _run(env, tmp_path, "forger", code, ["sim-0001", "sim-0002"])
    by_id = {d.device_id: d for d in outcome.devices}
    assert by_id["sim-0002"].status is DeviceStatus.FAILED
    assert by_id["sim-0002"].output != "forged"


def test_no_secret_is_within_reach(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    # Job mode, as Knative runs it: the secret only in the coordinator's environment,
    # so the coordinator's own copies are all a package could find in its heap.
    fleet(1)
    secret = f"{MARKER}{uuid.uuid4().hex}"
    signing_key = env.home / "keys" / "signing.key"
    code = f"""
        import gc, os, threading

        def attempt(what, fn):
            try:
                data = fn()
            except Exception as exc:
                return what + ": " + type(exc).__name__
            text = data if isinstance(data, str) else data.decode("latin-1")
            start = text.find({MARKER!r})
            return what + (": found " + text[start : start + 80] if start >= 0 else ": clean")

        def read(path):
            with open(path, "rb") as fh:
                return fh.read()

        def heap():
            found = []
            for obj in gc.get_objects():
                if isinstance(obj, dict):
                    values = obj.values()
                else:
                    values = obj if isinstance(obj, list | tuple) else ()
                found += [v for v in values if isinstance(v, str) and len(v) < 200]
            return " ".join(found)

        def run(ctx):
            ppid = os.getppid()
            return [
                attempt("os.environ", lambda: repr(dict(os.environ))),
                attempt("/proc/self/environ", lambda: read("/proc/self/environ")),
                attempt("/proc/ppid/environ", lambda: read(f"/proc/{{ppid}}/environ")),
                attempt("heap", heap),
                attempt("signing key", lambda: read({str(signing_key)!r})),
                attempt("thread", lambda: threading.Thread(target=len, args=("",)).start() or ""),
            ]
        """
    env.publish(write_package(tmp_path / "snoop", _manifest("snoop"), textwrap.dedent(code)))
    job = subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=env.variables() | {"TASK_TYPE": "snoop", "DEVICE_IDS": "sim-0001",
                               "MAYFLY_S3_SECRET_KEY": secret},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    [event] = env.result_events()
    [device] = event["data"]["devices"]
    report = device["output"]
    assert not [line for line in report if secret in line], report
    # What cannot even be opened, as a user would read it in the result.
    assert "signing key: PermissionError" in report
    assert "/proc/ppid/environ: PermissionError" in report
    assert "os.environ: clean" in report
    assert "thread: clean" in report  # threads still start: only processes are refused


def test_the_supply_chain_is_out_of_reach(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    fleet(1)
    trusted = env.home / "trusted"
    before = sorted(p.name for p in trusted.iterdir())
    # Another package's extracted files, as the cache holds them.
    env.coordinator().handle(new_request("reboot", devices=["sim-0001"]))
    reboot_py = next((env.home / "cache" / "packages").glob("*/reboot.py"))
    original = reboot_py.read_bytes()
    code = f"""
        def attempt(what, fn):
            try:
                fn()
            except Exception as exc:
                return what + ": " + type(exc).__name__
            return what + ": DONE"

        def write(path, data):
            with open(path, "w") as fh:
                fh.write(data)

        def run(ctx):
            return [
                attempt("trust a key", lambda: write({str(trusted / "evil.pub")!r}, "key")),
                attempt("rewrite reboot", lambda: write({str(reboot_py)!r}, "import os")),
            ]
        """
    outcome = _run(env, tmp_path, "usurper", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.output == ["trust a key: PermissionError", "rewrite reboot: PermissionError"]
    assert sorted(p.name for p in trusted.iterdir()) == before
    assert reboot_py.read_bytes() == original


def test_package_code_starts_no_process(env: Env, fleet: FleetFactory, tmp_path: Path) -> None:
    sim = fleet(2).simulator
    code = """
        import os, subprocess

        def attempt(what, fn):
            try:
                fn()
            except Exception as exc:
                return what + ": " + type(exc).__name__
            return what + ": STARTED"

        def run(ctx):
            return [
                attempt("fork", os.fork),
                attempt("subprocess", lambda: subprocess.Popen(["sleep", "30"])),
            ]
        """
    outcome = _run(env, tmp_path, "spawner", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.output == ["fork: PermissionError", "subprocess: PermissionError"]
    assert sim.records("sim-0002")["log"] == []


def test_a_flood_of_progress_frames_does_not_outrun_the_timeout(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    # The package floods its channel for 10 s and then returns: a coordinator
    # that kept reading frames without looking at its clocks let it finish
    # and called a 10 s attempt against a 2 s timeout "succeeded".
    fleet(1)
    name = "flooder"
    code = """
        import time

        def run(ctx):
            end = time.monotonic() + 10
            while time.monotonic() < end:
                ctx.progress(50, "x" * 150)
            return "flooded"
        """
    manifest = _manifest(name, device_timeout_s=2)
    env.publish(write_package(tmp_path / name, manifest, textwrap.dedent(code)))
    started = time.monotonic()
    # Each progress report costs its consumer a little, as `mayfly up -v`'s log lines do.
    outcome = env.coordinator().handle(
        new_request(name, devices=["sim-0001"]), on_progress=lambda _p: time.sleep(0.0001)
    )
    took = time.monotonic() - started
    assert isinstance(outcome, TaskCompleted), outcome
    [device] = outcome.devices
    assert device.status is DeviceStatus.TIMED_OUT, device
    assert device.output is None
    assert took < 6, f"the attempt ran {took:.1f} s against a 2 s device timeout"


def test_a_flood_of_log_lines_keeps_a_bounded_few(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(2)
    code = """
        def run(ctx):
            for n in range(3000):
                ctx.log.info("%04d %s", n, "y" * 600)
            ctx.log.error("the last one")
            return "chatty"
        """
    outcome = _run(env, tmp_path, "logger", code, ["sim-0001", "sim-0002"])
    for device in outcome.devices:
        assert device.status is DeviceStatus.SUCCEEDED, device
        assert len(device.logs) == MAX_DEVICE_LOG_LINES
        assert device.logs_dropped == 3001 - MAX_DEVICE_LOG_LINES
        assert max(len(line.message) for line in device.logs) == MAX_LOG_MESSAGE
    # 3 MB written: the result stays a small event.
    assert sum(len(to_kafka_record(part)[1]) for part in split_completed(outcome)) < 100_000


def test_a_log_frame_of_a_level_unknown_is_refused(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(1)
    code = """
        import json, os, struct

        def run(ctx):
            frame = json.dumps({"t": "log", "level": "\\x1b[2J", "message": "hi"}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack(">I", len(frame)) + frame)
                except OSError:
                    pass
            return "logged"
        """
    outcome = _run(env, tmp_path, "forged-level", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.status is DeviceStatus.FAILED
    assert "broke protocol" in (device.error or "")
    assert "'level' must be one of" in (device.error or "")


def test_a_package_reaches_only_the_device_it_was_given(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    # Both devices answer on one port, as behind a gateway: a port filter
    # cannot tell them apart, so package code must have no network at all.
    server = fleet(2)
    sim = server.simulator
    other = server.inventory().get("sim-0002").address
    port = int(other.split(":")[2].split("/")[0])
    code = f"""
        import socket, urllib.request

        def attempt(label, fn):
            try:
                fn()
            except Exception as exc:
                return f"{{label}}: refused ({{type(exc).__name__}})"
            return f"{{label}}: REACHED"

        def http():
            req = urllib.request.Request({other!r} + "/actions/reboot", data=b"{{}}", method="POST",
                                         headers={{"Content-Type": "application/json",
                                                  "Idempotency-Key": "neighbour-1"}})
            urllib.request.urlopen(req, timeout=2).read()

        def udp():
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port}))

        def run(ctx):
            ctx.device.action("reboot")
            return [attempt("http", http), attempt("udp", udp)]
        """
    outcome = _run(env, tmp_path, "neighbour", code, ["sim-0001"])
    [device] = outcome.devices
    assert sim.records("sim-0002")["log"] == [], "package code acted on a device it was not given"
    assert device.output == ["http: refused (URLError)", "udp: refused (PermissionError)"]
    assert [e["action"] for e in sim.records("sim-0001")["log"]] == ["reboot"]


def test_a_call_frame_naming_another_device_is_refused(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    sim = fleet(2).simulator
    code = """
        import json, os, struct

        def run(ctx):
            frame = json.dumps({"t": "call", "op": "action", "name": "reboot", "payload": {},
                                "device": "sim-0002"}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack(">I", len(frame)) + frame)
                except OSError:
                    continue
                return os.read(fd, 4096).decode(errors="replace")
        """
    outcome = _run(env, tmp_path, "redirector", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.status is DeviceStatus.FAILED, device
    assert "broke protocol" in (device.error or "")
    assert sim.records("sim-0002")["log"] == []
    assert sim.records("sim-0001")["log"] == []


def test_what_the_package_calls_reaches_its_device_through_the_coordinator(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    sim = fleet(1).simulator
    code = """
        import socket

        def run(ctx):
            try:
                socket.create_connection(("127.0.0.1", 1), timeout=1)
            except OSError as exc:
                network = type(exc).__name__
            first = ctx.device.action("reboot")
            ctx.device.wait_until(lambda s: s.get("status") == "online", timeout_s=5)
            state = ctx.device.state()["status"]
            return {"network": network, "first": sorted(first), "state": state}
        """
    outcome = _run(env, tmp_path, "caller", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.status is DeviceStatus.SUCCEEDED, device.error
    assert device.output["network"] == "PermissionError"
    assert device.output["state"] == "online"
    assert [entry["action"] for entry in sim.records("sim-0001")["log"]] == ["reboot"]


def test_a_payload_too_deep_or_too_big_is_told_to_the_package(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    sim = fleet(1).simulator
    code = """
        from mayfly.errors import DeviceActionError

        def run(ctx):
            deep = {}
            for _ in range(40):
                deep = {"d": deep}
            told = []
            for name, payload in (
                ("config-push", deep),
                ("config-push", {"blob": "x" * 300_000}),
                ("x" * 500, {}),
                ("line\\nbreak", {}),
                ("config-push", ["not", "an", "object"]),
            ):
                try:
                    ctx.device.action(name, payload)
                except DeviceActionError as exc:
                    told.append(exc.reason[:120])
            return told
        """
    outcome = _run(env, tmp_path, "oversized", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.status is DeviceStatus.SUCCEEDED, device.error
    assert [t.split(":")[0] for t in device.output] == ["the call cannot be sent"] * 5
    assert "nested more than 16 levels" in device.output[0]
    assert "exceeds" in device.output[1]
    assert "action name is 1 to 128 printable characters" in device.output[2]
    assert "action name is 1 to 128 printable characters" in device.output[3]
    assert "'payload' must be an object" in device.output[4]
    assert sim.records("sim-0001")["log"] == []


@pytest.fixture
def bystander() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP service on loopback that is not a device (a broker, a store...)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                seen.append(conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], seen
    stop.set()
    thread.join(timeout=2)
    server.close()


def test_no_service_on_the_network_is_reachable(
    env: Env, fleet: FleetFactory, tmp_path: Path, bystander: tuple[int, list[bytes]]
) -> None:
    fleet(1)
    port, seen = bystander
    code = f"""
        import socket

        def run(ctx):
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"hello")
            except OSError as exc:
                return "refused: " + type(exc).__name__
            return "CONNECTED"
        """
    outcome = _run(env, tmp_path, "prober", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.output == "refused: PermissionError"
    assert seen == []


def test_the_scratch_folder_is_private_and_removed(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    fleet(1)
    code = """
        import os

        def run(ctx):
            with open("notes.txt", "w") as fh:
                fh.write("kept here")
            return os.getcwd()
        """
    outcome = _run(env, tmp_path, "scribbler", code, ["sim-0001"])
    [device] = outcome.devices
    assert device.status is DeviceStatus.SUCCEEDED, device.error
    scratch = Path(str(device.output))
    assert scratch.name.startswith("task-")
    assert not scratch.exists(), "the scratch folder should go with its task process"
    assert json.dumps(device.output)  # plain data, as every output
    assert os.getcwd() != str(scratch)


def test_the_folder_job_mode_was_started_in_is_out_of_reach(
    env: Env, fleet: FleetFactory, tmp_path: Path
) -> None:
    # `python -m mayfly.coordinator` puts its current folder first on sys.path;
    # that folder is not part of what package code may read.
    fleet(1)
    started_in = tmp_path / "operator"
    started_in.mkdir()
    (started_in / "secret.txt").write_text(f"{MARKER}{uuid.uuid4().hex}")
    code = f"""
        def run(ctx):
            try:
                return open({str(started_in / "secret.txt")!r}).read()
            except OSError as exc:
                return type(exc).__name__
        """
    env.publish(write_package(tmp_path / "reader", _manifest("reader"), textwrap.dedent(code)))
    job = subprocess.run(
        [sys.executable, "-m", "mayfly.coordinator"],
        env=env.variables() | {"TASK_TYPE": "reader", "DEVICE_IDS": "sim-0001"},
        cwd=started_in, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    [event] = env.result_events()
    [device] = event["data"]["devices"]
    assert device["output"] == "PermissionError", device
