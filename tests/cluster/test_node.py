"""The one-node cluster changes nothing on this machine (issue rules, dev/services/cluster.py).

What a user of the machine would notice: a port opened beyond loopback, a kernel tunable
changed, pods' processes in the machine's own cgroups. Checked against the running
`cluster` service (``make cluster-test``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import KnativeCluster

pytestmark = pytest.mark.cluster

TUNABLES = (
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
)
"""What the kubelet writes at start (Kubernetes' defaults for a node)."""
NODE_PORTS = {53, 2379, 6443, 8081, 8082, 10248, 10250, 10256, 10257, 10259}
"""What the node's programs listen on, inside its network namespace."""


def _listeners() -> list[tuple[str, int]]:
    """(address, port) of every TCP listener in this process's network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].rsplit(":", 1)
            if len(address) == 8:
                octets = bytes.fromhex(address)[::-1]
                text = ".".join(str(b) for b in octets)
            else:
                text = "::" if set(address) == {"0"} else address
            found.append((text, int(port, 16)))
    return found


def _children(cluster: KnativeCluster) -> dict[str, int]:
    children: dict[str, int] = json.loads((cluster.kubeconfig.parent / "children.json").read_text())
    return children


def test_on_this_machine_the_cluster_listens_on_loopback_only(
    knative_cluster: KnativeCluster,
) -> None:
    listeners = _listeners()
    # Its two relays (API server, ingress) are on 127.0.0.1 ...
    relays = {port for address, port in listeners if address == "127.0.0.1"}
    assert {16443, 18082} <= relays
    # ... and nothing of the node is reachable here on any other address.
    exposed = [(a, p) for a, p in listeners if p in NODE_PORTS | {16443, 18082}]
    assert all(address == "127.0.0.1" for address, _ in exposed), exposed


def test_the_kubelet_writes_its_kernel_tunables_to_files_of_its_own(
    knative_cluster: KnativeCluster,
) -> None:
    kubelet = _children(knative_cluster)["node"]
    mounts = {
        line.split()[4] for line in Path(f"/proc/{kubelet}/mountinfo").read_text().splitlines()
    }
    assert set(TUNABLES) <= mounts
    ours = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    assert not set(TUNABLES) & ours


def test_pods_run_under_the_clusters_own_cgroup_root(knative_cluster: KnativeCluster) -> None:
    base = Path("/sys/fs/cgroup")
    pids = base / "pids" if (base / "pids").is_dir() else base
    root = pids / "mayfly-cluster"
    procs = [int(pid) for file in root.rglob("cgroup.procs") for pid in file.read_text().split()]
    assert procs, f"no process under {root}"
    # A pod's process (Knative's controller, say) is there, not in the machine's cgroups.
    pod_process = next(
        pid
        for pid in procs
        if Path(f"/proc/{pid}/cmdline").exists()
        and b"/ko-app/" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    cgroup = Path(f"/proc/{pod_process}/cgroup").read_text()
    assert "/mayfly-cluster/" in cgroup
