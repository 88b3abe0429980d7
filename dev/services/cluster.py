"""The `cluster` service: a one-node Kubernetes with Knative Serving and Eventing, here.

Everything is built or fetched as its own kind of package and kept in the cache: the API
server (`kube`'s mayfly-kube, with etcd), kubelet, controller-manager, scheduler and
kube-proxy (dev/cluster/node), Knative's controllers (dev/cluster/knative), Traefik as the
ingress (dev/cluster/traefik, its Knative provider) and CoreDNS (dev/cluster/coredns) from
Go modules; containerd, runc, the CNI plugins, iptables and debootstrap from Debian packages,
extracted into the cache (nothing is installed system-wide); the pause container from
Kubernetes' C source; Mayfly's image from a debootstrapped Debian with the project's wheels.
There is no registry: images are OCI archives (services/ociimage.py) imported into the
node's containerd under ``dev.local/``.

It all runs in the network namespace `NETNS`, whose ``lo`` carries the node address
`NODE_IP` and the route to the service range; pods get addresses from a CNI bridge.
The host reaches it through relays on 127.0.0.1 (the API server at ``ports["apiserver"]``,
Traefik's cluster-local entry point at ``ports["ingress"]``), and pods reach the host's
Kafka, S3, Jaeger and a device simulator at `NODE_IP` through relays the other way
(`POD_REACH`). Nothing on the host changes: containerd and the kubelet share a private
mount namespace in which the three kernel tunables the kubelet writes are bind-mounted files
of this service's own; pods' cgroups live under the private root `CGROUP_ROOT`; `down`
kills what runs there and removes it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from services import gobuild, ociimage
from services.base import (
    DEV_DIR,
    HOST,
    NAMESPACE_TOOLS,
    NODE_IP,
    Paths,
    Service,
    ServiceError,
    find_tool,
    install_step,
    namespaces_unavailable,
    say,
    services_home,
)
from services.jaeger import Jaeger
from services.kafka import Kafka
from services.knative import Knative
from services.kube import KUSTOMIZE_ENV, Kube, _https_request, version_ldflags
from services.s3 import S3

# Exported to `run` children and printed by `env`; tests/conftest.py reads them.
KUBECONFIG_ENV = "MAYFLY_TEST_CLUSTER_KUBECONFIG"
"""A kubeconfig for the cluster's API server, from the host (namespace ``mayfly``)."""
INGRESS_ENV = "MAYFLY_TEST_CLUSTER_INGRESS"
"""``http://127.0.0.1:PORT``: Traefik's cluster-local entry point (send a ``Host`` header)."""
NODE_ENV = "MAYFLY_TEST_CLUSTER_NODE"
"""The address at which pods reach the host's servers (`POD_REACH`)."""

NETNS = "mayfly-cluster"
CGROUP_ROOT = "mayfly-cluster"
SERVICE_RANGE = "10.96.0.0/24"
POD_RANGE = "10.88.0.0/16"
NODE_NAME = "mayfly-node"
API_PORT = 6443
POD_REACH: Mapping[str, int] = {
    "s3": S3.port,
    "kafka": Kafka.ports["cluster"],
    "otlp grpc": Jaeger.ports["otlp grpc"],
    "otlp http": Jaeger.ports["otlp http"],
    "devices": 18090,
}
"""Host ports that pods reach at `NODE_IP`: the test servers' (Kafka's listener for the
cluster, which advertises `NODE_IP`), and one for a device simulator a test starts."""

DEBIAN_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "libip6tc2",
    "libnftnl11",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
    "conntrack",
    "debootstrap",
)
IMAGE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
"""Installed by debootstrap into Mayfly's image, beside the minimal base."""
MAYFLY_IMAGE = "dev.local/mayfly/functions:dev"
PAUSE_IMAGE = "dev.local/pause:3.10"


@dataclass(frozen=True)
class Binary:
    """One of Knative's Go programs, built into its own image."""

    image: str
    """Short name: the image is dev.local/knative/<image>:<version>."""
    package: str


SERVING = tuple(
    Binary(f"serving-{name}", f"knative.dev/serving/cmd/{name}")
    for name in ("controller", "activator", "autoscaler", "webhook", "queue")
)
EVENTING = tuple(
    Binary(image, f"knative.dev/eventing/cmd/{path}")
    for image, path in (
        ("eventing-controller", "controller"),
        ("eventing-webhook", "webhook"),
        ("eventing-jobsink", "jobsink"),
        ("eventing-mtchannel-broker", "mtchannel_broker"),
        ("eventing-broker-ingress", "broker/ingress"),
        ("eventing-broker-filter", "broker/filter"),
        ("eventing-imc-controller", "in_memory/channel_controller"),
        ("eventing-imc-dispatcher", "in_memory/channel_dispatcher"),
        ("eventing-apiserver-receive-adapter", "apiserver_receive_adapter"),
        ("eventing-auth-proxy", "auth_proxy"),
        ("eventing-mtping", "mtping"),
        ("eventing-requestreply", "requestreply"),
    )
)

# Knative's manifests, by module and glob: Serving's core with its networking and caching
# CRDs; Eventing's core, the in-memory channel and the channel-based Broker.
MANIFESTS: tuple[tuple[str, str], ...] = (
    ("knative.dev/serving", "config/core/**/*.yaml"),
    ("knative.dev/networking", "config/*.yaml"),
    ("knative.dev/caching", "config/*.yaml"),
    ("knative.dev/eventing", "config/core/**/*.yaml"),
    ("knative.dev/eventing", "config/channels/in-memory-channel/**/*.yaml"),
    ("knative.dev/eventing", "config/brokers/mt-channel-broker/**/*.yaml"),
)
KO_PREFIX = "ko://"
POD_CPU = "25m"
"""Each Knative pod's CPU request: a dozen of them and the coordinators fit 2 cores."""


class Cluster(Service):
    """A one-node Kubernetes (containerd, kubelet) with Knative Serving, Eventing, Traefik."""

    name = "cluster"
    port = 16443
    ports: ClassVar[Mapping[str, int]] = {"apiserver": 16443, "ingress": 18082}
    # First start: a dozen Knative pods on 2 cores, each making caches and certificates.
    start_timeout = 600.0
    default = False
    node_dir = DEV_DIR / "cluster" / "node"
    knative_dir = DEV_DIR / "cluster" / "knative"
    traefik_dir = DEV_DIR / "cluster" / "traefik"
    coredns_dir = DEV_DIR / "cluster" / "coredns"
    project_dir = DEV_DIR.parent
    kube = Kube()
    knative = Knative()

    @property
    def endpoint(self) -> str:
        return f"https://{HOST}:{self.port}"

    def unavailable(self) -> str | None:
        tools = dict(NAMESPACE_TOOLS, **{"apt-get": "apt", "dpkg-deb": "dpkg", "gcc": "gcc"})
        if problem := namespaces_unavailable(
            "a node (network namespace, mounts, cgroups)", tools, ["--net", "--mount"]
        ):
            return problem
        if _debian_release() is None:
            return "Mayfly's image is debootstrapped from this machine's Debian release"
        return None

    # -- install -------------------------------------------------------------------------

    def knative_version(self) -> str:
        return Kube._required_version(self.knative_dir, "knative.dev/serving")

    def _cache(self, paths: Paths, what: str) -> Path:
        return paths.cache_dir / f"cluster-{what}"

    def node_binary(self, paths: Paths) -> Path:
        return self._cache(paths, f"node-{self.kube.version}") / "mayfly-node"

    def knative_binary(self, paths: Paths, binary: Binary) -> Path:
        return self._cache(paths, f"knative-{self.knative_version()}") / binary.image / "ko-app"

    def traefik(self, paths: Paths) -> Path:
        version = Kube._required_version(self.traefik_dir, "github.com/traefik/traefik/v3")
        return self._cache(paths, f"traefik-{version}") / "traefik"

    def coredns(self, paths: Paths) -> Path:
        version = Kube._required_version(self.coredns_dir, "github.com/coredns/coredns")
        return self._cache(paths, f"coredns-{version}") / "mayfly-coredns"

    def debian_root(self, paths: Paths) -> Path:
        digest = hashlib.sha256(" ".join(DEBIAN_PACKAGES).encode()).hexdigest()[:12]
        return self._cache(paths, f"debs-{digest}") / "root"

    def images_dir(self, paths: Paths) -> Path:
        return self._cache(paths, "images")

    def install(self, paths: Paths) -> None:
        self.kube.install(paths)  # mayfly-kube: this cluster's API server too
        self.knative.build_objects_tool(paths)
        gobuild.build(
            self,
            paths,
            module_dir=self.node_dir,
            package=".",
            sources=("main.go",),
            binary=self.node_binary(paths),
            what=f"kubelet, controller-manager, scheduler and kube-proxy {self.kube.version}",
            minutes=5,
            ldflags=version_ldflags(self.kube.version),
        )
        for binary in (*SERVING, *EVENTING):
            gobuild.build(
                self,
                paths,
                module_dir=self.knative_dir,
                package=binary.package,
                binary=self.knative_binary(paths, binary),
                what=f"Knative's {binary.image} {self.knative_version()}",
                minutes=4 if binary is SERVING[0] else 1,
            )
        gobuild.build(
            self,
            paths,
            module_dir=self.traefik_dir,
            package="github.com/traefik/traefik/v3/cmd/traefik",
            binary=self.traefik(paths),
            what="Traefik",
            minutes=5,
        )
        gobuild.build(
            self,
            paths,
            module_dir=self.coredns_dir,
            package=".",
            sources=("main.go",),
            binary=self.coredns(paths),
            what="CoreDNS",
            minutes=2,
        )
        self._install_debs(paths)
        self._install_images(paths)

    def _install_debs(self, paths: Paths) -> None:
        root = self.debian_root(paths)
        stamp = root.with_name("complete.stamp")
        if stamp.is_file():
            return
        say(f"cluster: fetching Debian packages {', '.join(DEBIAN_PACKAGES)} into {root}...")
        folder = root.parent
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "debs").mkdir(parents=True)
        install_step(
            self,
            paths,
            ["apt-get", "download", *DEBIAN_PACKAGES],
            cwd=folder / "debs",
        )
        for deb in sorted((folder / "debs").glob("*.deb")):
            install_step(self, paths, ["dpkg-deb", "-x", str(deb), str(root)], cwd=folder)
        stamp.write_text(" ".join(sorted(p.name for p in (folder / "debs").glob("*.deb"))) + "\n")

    def _install_images(self, paths: Paths) -> None:
        images = self.images_dir(paths)
        images.mkdir(parents=True, exist_ok=True)
        pause = self._pause(paths)
        wanted = [
            (
                ociimage.Image(name=PAUSE_IMAGE, files={"pause": pause}, entrypoint=["/pause"]),
                pause,
            )
        ]
        for binary in (*SERVING, *EVENTING):
            built = self.knative_binary(paths, binary)
            wanted.append(
                (
                    ociimage.Image(
                        name=self.image_name(binary),
                        files={f"ko-app/{binary.image}": built},
                        entrypoint=[f"/ko-app/{binary.image}"],
                        env={"PATH": "/ko-app", "KO_DATA_PATH": "/var/run/ko"},
                    ),
                    built,
                )
            )
        for image, source in wanted:
            archive = images / f"{image.name.rsplit('/', 1)[1].replace(':', '_')}.tar"
            stamp = archive.with_suffix(".stamp")
            digest = f"{image.name} {source.stat().st_mtime_ns} {source.stat().st_size}"
            if archive.is_file() and stamp.is_file() and stamp.read_text() == digest:
                continue
            ociimage.write_archive(image, archive)
            stamp.write_text(digest)
        self._mayfly_image(paths)

    def image_name(self, binary: Binary) -> str:
        return f"dev.local/knative/{binary.image}:{self.knative_version()}"

    def _pause(self, paths: Paths) -> Path:
        binary = self._cache(paths, f"pause-{self.kube.version}") / "pause"
        if binary.is_file():
            return binary
        source = (
            gobuild.module_dirs(self, self.node_dir, ["k8s.io/kubernetes"])["k8s.io/kubernetes"]
            / "build"
            / "pause"
            / "linux"
            / "pause.c"
        )
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name("pause.partial")
        install_step(
            self,
            paths,
            ["gcc", "-Os", "-static", "-o", str(partial), str(source), "-DVERSION=mayfly"],
            cwd=binary.parent,
        )
        partial.replace(binary)
        return binary

    def _base_rootfs(self, paths: Paths) -> Path:
        """A minimal Debian of this machine's release with Python, made once by debootstrap."""
        release, mirror = _debian_release() or ("", "")
        rootfs = self._cache(paths, f"rootfs-{release}") / "rootfs"
        stamp = rootfs.with_name("complete.stamp")
        if stamp.is_file():
            return rootfs
        say(f"cluster: debootstrapping Debian {release} for Mayfly's image (~1 min)...")
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        debs = self.debian_root(paths)
        env = dict(os.environ, DEBOOTSTRAP_DIR=str(debs / "usr" / "share" / "debootstrap"))
        install_step(
            self,
            paths,
            [
                str(debs / "usr" / "sbin" / "debootstrap"),
                "--variant=minbase",
                f"--include={','.join(IMAGE_PACKAGES)}",
                release,
                str(rootfs),
                mirror,
            ],
            cwd=rootfs.parent,
            env=env,
        )
        for trimmed in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc"):
            for child in (rootfs / trimmed).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
        stamp.write_text(f"{release} {mirror}\n")
        return rootfs

    def _mayfly_image(self, paths: Paths) -> None:
        """The Containerfile's image, without a registry or a container engine."""
        archive = self.images_dir(paths) / "mayfly.tar"
        stamp = archive.with_suffix(".stamp")
        digest = _tree_digest(
            self.project_dir, ["pyproject.toml", "README.md", "src/mayfly", "functions"]
        )
        if archive.is_file() and stamp.is_file() and stamp.read_text() == digest:
            return
        base = self._base_rootfs(paths)
        say("cluster: building Mayfly's image from this checkout (~1 min)...")
        work = archive.with_name("mayfly-rootfs")
        shutil.rmtree(work, ignore_errors=True)
        # cp -a, not shutil.copytree: the tree holds device nodes (/dev/zero...), which
        # copytree would read as endless files.
        install_step(self, paths, ["cp", "-a", str(base), str(work)], cwd=base.parent)
        wheels = work / "wheels"
        # From a copy of what the Containerfile copies: a build in the checkout would reuse
        # its build/ folder, which can hold modules deleted since.
        source = archive.with_name("mayfly-source")
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(
            self.project_dir / "src",
            source / "src",
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(self.project_dir / name, source / name)
        install_step(
            self,
            paths,
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), "."],
            cwd=source,
        )
        shutil.rmtree(source)
        # In the chroot: no network (everything is a wheel here), none of our pip settings.
        install_step(
            self,
            paths,
            [
                "chroot",
                str(work),
                "/bin/sh",
                "-c",
                "python3 -m venv /opt/mayfly && /opt/mayfly/bin/pip install --quiet "
                "--no-index --no-cache-dir --disable-pip-version-check --find-links /wheels "
                "mayfly",
            ],
            cwd=work,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"},
        )
        shutil.rmtree(wheels)
        shutil.copytree(self.project_dir / "functions", work / "app" / "functions")
        for cache in (work / "app").rglob("__pycache__"):
            shutil.rmtree(cache)
        # As the Containerfile: user 65532, MAYFLY_HOME writable scratch, one worker.
        ociimage.write_archive(
            ociimage.Image(
                name=MAYFLY_IMAGE,
                rootfs=work,
                entrypoint=[
                    "/bin/sh",
                    "-c",
                    'exec functions-framework --source "/app/functions/${FUNCTION_TARGET}'
                    '/main.py" --target "${FUNCTION_TARGET}"',
                ],
                env={
                    "PATH": "/opt/mayfly/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                    "/sbin:/bin",
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONDONTWRITEBYTECODE": "1",
                    "FUNCTION_TARGET": "coordinator",
                    "PORT": "8080",
                    "MAYFLY_HOME": "/tmp/mayfly",  # noqa: S108 - the container's own /tmp
                    "WORKERS": "1",
                    "THREADS": "2",
                },
            ),
            archive,
        )
        shutil.rmtree(work)
        stamp.write_text(digest)

    # -- start ---------------------------------------------------------------------------

    def command(self, paths: Paths) -> list[str]:
        _teardown()  # what a killed run left
        data = paths.data_dir
        self._make_netns()
        self._make_cgroups()
        token = secrets.token_hex(16)
        (data / "token").write_text(token)
        certs = data / "certs"
        names = [NODE_IP, SERVICE_RANGE.replace("0/24", "1"), "kubernetes"]
        names += [f"kubernetes.default{suffix}" for suffix in ("", ".svc", ".svc.cluster.local")]
        made = subprocess.run(
            [str(self.kube.binary(paths)), "certs", str(certs), *names],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise ServiceError(f"cluster: making certificates failed: {made.stderr.strip()}")
        tokens = data / "tokens.csv"
        tokens.write_text(f'{token},mayfly-cluster,mayfly-cluster,"system:masters"\n')
        inner = data / "kubeconfig"
        _write_kubeconfig(inner, f"https://{NODE_IP}:{API_PORT}", certs / "ca.crt", token)
        _write_kubeconfig(
            self.kubeconfig(paths), f"https://{HOST}:{self.port}", certs / "ca.crt", token
        )
        bin_dir = self._bin_dir(paths)
        debs = self.debian_root(paths)
        tools_env = {
            "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(data),
            "LD_LIBRARY_PATH": str(debs / "usr" / "lib" / "x86_64-linux-gnu"),
            "XTABLES_LIBDIR": str(debs / "usr" / "lib" / "x86_64-linux-gnu" / "xtables"),
        }
        (data / "objects.json").write_text(json.dumps(self._objects(paths)))
        logs = paths.log_file.parent
        node = str(self.node_binary(paths))
        kubeconfig = f"--kubeconfig={inner}"
        auth = [f"--authentication-kubeconfig={inner}", f"--authorization-kubeconfig={inner}"]

        def child(name: str, argv: list[str], **extra: Any) -> dict[str, Any]:
            # All but the API server need it, and some exit when it does not answer.
            after = {} if name == "apiserver" else {"after": f"{NODE_IP}:{API_PORT}"}
            return {
                "name": name,
                "argv": argv,
                "env": tools_env,
                "log": str(logs / f"cluster-{name}.log"),
                **after,
                **extra,
            }

        children = [
            child(
                "apiserver",
                [
                    str(self.kube.binary(paths)),
                    "serve",
                    f"-etcd-dir={data / 'etcd'}",
                    "--",
                    "--etcd-servers=http://127.0.0.1:2379",
                    f"--bind-address={NODE_IP}",
                    f"--advertise-address={NODE_IP}",
                    f"--secure-port={API_PORT}",
                    f"--tls-cert-file={certs / 'serving.crt'}",
                    f"--tls-private-key-file={certs / 'serving.key'}",
                    f"--client-ca-file={certs / 'ca.crt'}",
                    f"--token-auth-file={tokens}",
                    "--anonymous-auth=false",
                    "--authorization-mode=AlwaysAllow",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={certs / 'sa.key'}",
                    f"--service-account-signing-key-file={certs / 'sa.key'}",
                    f"--service-cluster-ip-range={SERVICE_RANGE}",
                    "--kubelet-preferred-address-types=InternalIP",
                    "--profiling=false",
                ],
            ),
            child(
                "controller-manager",
                [
                    node,
                    "controller-manager",
                    kubeconfig,
                    *auth,
                    f"--root-ca-file={certs / 'ca.crt'}",
                    f"--service-account-private-key-file={certs / 'sa.key'}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=10257",
                    # No cloud, no volumes to provision, one node whose pod range is fixed.
                    "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,"
                    "-persistentvolume-binder,-persistentvolume-expander",
                    f"--cluster-cidr={POD_RANGE}",
                ],
            ),
            child(
                "scheduler",
                [
                    node,
                    "scheduler",
                    kubeconfig,
                    *auth,
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=10259",
                ],
            ),
            child("proxy", [node, "proxy", f"--config={self._proxy_config(paths)}"]),
            child("node", self._node_argv(paths)),
            child("coredns", [str(self.coredns(paths)), "-conf", str(self._corefile(paths))]),
            child("traefik", [str(self.traefik(paths)), f"--configfile={self._traefik(paths)}"]),
            child(
                "setup",
                [
                    sys.executable,
                    "-m",
                    "services.clustersetup",
                    str(data / "objects.json"),
                    str(inner),
                    str(data / "setup.done"),
                ],
                once=True,
            ),
        ]
        children[-1]["env"] = dict(tools_env, PYTHONPATH=str(DEV_DIR))
        routes = [
            {"listen": "host", "bind": f"{HOST}:{self.port}", "dial": f"{NODE_IP}:{API_PORT}"},
            # Knative's cluster-local routes are on Traefik's private entry point.
            {
                "listen": "host",
                "bind": f"{HOST}:{self.ports['ingress']}",
                "dial": f"{NODE_IP}:8082",
            },
        ]
        routes += [
            {"listen": "inner", "bind": f"{NODE_IP}:{port}", "dial": f"{HOST}:{port}"}
            for port in POD_REACH.values()
        ]
        spec = {
            "netns": NETNS,
            "routes": routes,
            "pids": str(data / "children.json"),
            "children": children,
        }
        spec_file = data / "nsrelay.json"
        spec_file.write_text(json.dumps(spec, indent=2))
        return [sys.executable, "-m", "services.nsrelay", str(spec_file)]

    def server_env(self, paths: Paths) -> dict[str, str]:
        env = super().server_env(paths)
        env["PYTHONPATH"] = str(DEV_DIR)
        return env

    def kubeconfig(self, paths: Paths) -> Path:
        return paths.data_dir / "kubeconfig-host"

    def _make_netns(self) -> None:
        ip = find_tool("ip", "iproute2")
        for argv in (
            [ip, "netns", "add", NETNS],
            [ip, "-n", NETNS, "link", "set", "lo", "up"],
            [ip, "-n", NETNS, "addr", "add", f"{NODE_IP}/32", "dev", "lo"],
            # The service range must route for the node's own processes (the API server
            # calls webhooks at service addresses); kube-proxy's rules then rewrite it.
            [ip, "-n", NETNS, "route", "add", SERVICE_RANGE, "dev", "lo", "src", NODE_IP],
            # Forwarding between pods and the node: this namespace's own setting.
            [
                "nsenter",
                f"--net=/run/netns/{NETNS}",
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ],
        ):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise ServiceError(f"cluster: `{' '.join(argv)}` failed: {done.stderr.strip()}")

    def _make_cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / CGROUP_ROOT
            root.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new cpuset has no CPUs or memory nodes
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (root / key).write_text((hierarchy / key).read_text())

    def _bin_dir(self, paths: Paths) -> Path:
        """The tools the node's programs run by name, from the extracted Debian packages."""
        debs = self.debian_root(paths)
        bin_dir = paths.data_dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        tools = {
            name: debs / "usr" / "sbin" / "xtables-nft-multi"
            for family in ("iptables", "ip6tables")
            for name in (family, f"{family}-save", f"{family}-restore")
        }
        tools.update(
            {
                name: debs / "usr" / "bin" / name
                for name in ("containerd", "containerd-shim-runc-v2", "ctr", "runc")
            }
        )
        tools["conntrack"] = debs / "usr" / "sbin" / "conntrack"
        for name, target in tools.items():
            (bin_dir / name).symlink_to(target)
        return bin_dir

    def _proxy_config(self, paths: Paths) -> Path:
        config = paths.data_dir / "kube-proxy.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(paths.data_dir / "kubeconfig")},
                    "mode": "iptables",
                    "clusterCIDR": POD_RANGE,
                    "hostnameOverride": NODE_NAME,
                    "bindAddress": NODE_IP,
                    "healthzBindAddress": "127.0.0.1:10256",
                    "metricsBindAddress": "127.0.0.1:10249",
                    # Pods of one bridge calling each other's Services: without the host's
                    # br_netfilter the reply would skip the rewrite, so rewrite the source.
                    "iptables": {"masqueradeAll": True},
                    # Leave the kernel's conntrack tunables (host-wide) alone.
                    "conntrack": {
                        "maxPerCore": 0,
                        "tcpEstablishedTimeout": "0s",
                        "tcpCloseWaitTimeout": "0s",
                    },
                }
            )
        )
        return config

    def _node_argv(self, paths: Paths) -> list[str]:
        """containerd and the kubelet in one private mount namespace (the kubelet's volume
        mounts must be what runc sees), with the kernel tunables the kubelet writes
        bind-mounted from files of ours: it sees the values it wants and the host's stay."""
        data = paths.data_dir
        ctd = data / "containerd"
        ctd.mkdir()
        cni = data / "cni"
        cni.mkdir()
        debs = self.debian_root(paths)
        (cni / "10-mayfly.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "mayfly",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_RANGE}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(data / "cni-ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                        {"type": "loopback"},
                    ],
                }
            )
        )
        socket = ctd / "containerd.sock"
        (data / "containerd.toml").write_text(
            _CONTAINERD_TOML.format(
                root=ctd / "root",
                state=ctd / "state",
                socket=socket,
                pause=PAUSE_IMAGE,
                runc=debs / "usr" / "bin" / "runc",
                cni_bin=debs / "usr" / "lib" / "cni",
                cni_conf=cni,
            )
        )
        (data / "resolv.conf").write_text(f"nameserver {NODE_IP}\nsearch cluster.local\n")
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine may have cgroup v1 only; cgroupfs, under a root of our own.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{socket}",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "failSwapOn": False,
            "podLogsDir": str(data / "pod-logs"),
            "resolvConf": str(data / "resolv.conf"),
            "protectKernelDefaults": False,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": "cluster.local",
            "localStorageCapacityIsolation": False,
        }
        (data / "kubelet.json").write_text(json.dumps(kubelet))
        tunables = {"vm/overcommit_memory": "1", "kernel/panic": "10", "kernel/panic_on_oops": "1"}
        mounts = []
        for key, value in tunables.items():
            file = data / f"sysctl-{key.replace('/', '-')}"
            file.write_text(value + "\n")
            mounts.append(f"mount --bind {file} /proc/sys/{key}")
        imports = " && ".join(
            f"ctr --address {socket} -n k8s.io images import {archive}"
            for archive in sorted(self.images_dir(paths).glob("*.tar"))
        )
        kubelet_argv = " ".join(
            [
                str(self.node_binary(paths)),
                "kubelet",
                f"--config={data / 'kubelet.json'}",
                f"--kubeconfig={data / 'kubeconfig'}",
                f"--root-dir={data / 'kubelet'}",
                f"--cert-dir={data / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
            ]
        )
        logs = paths.log_file.parent
        script = "\n".join(
            [
                "set -e",
                *mounts,
                f"containerd --config {data / 'containerd.toml'} "
                f"> {logs / 'cluster-containerd.log'} 2>&1 &",
                f"for i in $(seq 1 100); do [ -S {socket} ] && break; sleep 0.1; done",
                f"{imports} > /dev/null",
                f"exec {kubelet_argv}",
            ]
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _corefile(self, paths: Paths) -> Path:
        corefile = paths.data_dir / "Corefile"
        corefile.write_text(
            _COREFILE.format(node=NODE_IP, kubeconfig=paths.data_dir / "kubeconfig")
        )
        return corefile

    def _traefik(self, paths: Paths) -> Path:
        config = paths.data_dir / "traefik.json"
        token = (paths.data_dir / "token").read_text()
        config.write_text(
            json.dumps(
                {
                    "entryPoints": {
                        "web": {"address": f"{NODE_IP}:8081"},
                        "private": {"address": f"{NODE_IP}:8082"},
                    },
                    "experimental": {"knative": True},
                    "providers": {
                        "knative": {
                            "endpoint": f"https://{NODE_IP}:{API_PORT}",
                            "token": token,
                            "certAuthFilePath": str(paths.data_dir / "certs" / "ca.crt"),
                            "publicEntrypoints": ["web"],
                            "publicService": {"name": "traefik", "namespace": "traefik"},
                            "privateEntrypoints": ["private"],
                            "privateService": {"name": "traefik-private", "namespace": "traefik"},
                        }
                    },
                    "log": {"level": "INFO"},
                    "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
                }
            )
        )
        return config

    # -- Knative's manifests -------------------------------------------------------------

    @functools.cache  # noqa: B019 - one instance per process (the registry's); dirs never move
    def _module_dirs(self) -> dict[str, Path]:
        return gobuild.module_dirs(
            self,
            self.knative_dir,
            [
                "knative.dev/serving",
                "knative.dev/eventing",
                "knative.dev/networking",
                "knative.dev/caching",
            ],
        )

    def _objects(self, paths: Paths) -> list[dict[str, Any]]:
        """Knative's release manifests as this node runs them, then Traefik's Services."""
        modules = self._module_dirs()
        files: list[Path] = []
        for module, pattern in MANIFESTS:
            matched = sorted(modules[module].glob(pattern))
            if not matched:
                raise ServiceError(f"cluster: no {pattern} in {modules[module]}")
            files += matched
        images = {
            f"{KO_PREFIX}{binary.package}": self.image_name(binary)
            for binary in (*SERVING, *EVENTING)
        }
        objects: list[dict[str, Any]] = []
        seen: set[tuple[str, str, str]] = set()
        for obj in self.knative.read_objects(paths, files):
            meta = obj.get("metadata") or {}
            key = (obj["kind"], meta.get("namespace", ""), meta.get("name", ""))
            # One replica each, no autoscaler of Kubernetes' own (no metrics server here).
            if key in seen or obj["kind"] == "HorizontalPodAutoscaler":
                continue
            seen.add(key)
            text = json.dumps(obj)
            for ko, image in images.items():
                text = text.replace(json.dumps(ko), json.dumps(image))
            if KO_PREFIX in text:
                unknown = sorted(set(re.findall(r'"ko://[^"]+"', text)))
                raise ServiceError(f"cluster: Knative's {key} needs an image not built: {unknown}")
            obj = json.loads(text)
            _fit_pods(obj)
            _configure(obj, self)
            objects.append(obj)
        objects += _missing_config_maps(objects)
        objects += _traefik_services()
        return objects

    # -- probe, exports, stop --------------------------------------------------------------

    def _api(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        paths = Paths.for_service(services_home(), self.name)
        return _https_request(
            HOST,
            self.port,
            path,
            ca=paths.data_dir / "certs" / "ca.crt",
            token=(paths.data_dir / "token").read_text(),
            timeout=10.0,
            method=method,
            body=body,
        )

    def probe(self) -> str | None:
        paths = Paths.for_service(services_home(), self.name)
        if not (paths.data_dir / "setup.done").is_file():
            return "Knative's manifests are not all applied yet"
        try:
            status, body = self._api("GET", f"/api/v1/nodes/{NODE_NAME}")
            if status != 200:
                return f"no node yet: HTTP {status}"
            ready = [
                c["status"]
                for c in json.loads(body)["status"].get("conditions", [])
                if c["type"] == "Ready"
            ]
            if ready != ["True"]:
                return "the node is not Ready"
            for namespace in ("knative-serving", "knative-eventing"):
                status, body = self._api("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments")
                waiting = [
                    d["metadata"]["name"]
                    for d in json.loads(body)["items"]
                    if (d.get("status") or {}).get("availableReplicas", 0)
                    < d["spec"].get("replicas", 1)
                ]
                if waiting:
                    return (
                        f"{namespace}: {len(waiting)} deployments not available, e.g. {waiting[0]}"
                    )
            # Available is not serving: each webhook must answer a dry run (it defaults and
            # validates every Knative object, and the API server waits for it).
            for path, obj in _DRY_RUNS:
                status, body = self._api("POST", f"{path}?dryRun=All", obj)
                if status != 201:
                    return f"a dry run of {obj['kind']} answered HTTP {status}: {body[:200]!r}"
        except (OSError, ValueError, KeyError) as exc:
            return f"no proper answer from the cluster's API server: {exc!r}"
        return None

    def exports(self) -> dict[str, str]:
        paths = Paths.for_service(services_home(), self.name)
        return {
            KUBECONFIG_ENV: str(self.kubeconfig(paths)),
            INGRESS_ENV: f"http://{HOST}:{self.ports['ingress']}",
            NODE_ENV: NODE_IP,
            KUSTOMIZE_ENV: str(self.kube.kustomize(paths)),
        }

    def after_stop(self, paths: Paths) -> None:
        _teardown()


_DRY_RUNS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "/apis/serving.knative.dev/v1/namespaces/mayfly/services",
        {
            "apiVersion": "serving.knative.dev/v1",
            "kind": "Service",
            "metadata": {"name": "mayfly-probe"},
            "spec": {"template": {"spec": {"containers": [{"image": MAYFLY_IMAGE}]}}},
        },
    ),
    (
        "/apis/eventing.knative.dev/v1/namespaces/mayfly/brokers",
        {
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "metadata": {"name": "mayfly-probe"},
        },
    ),
)


def _fit_pods(obj: dict[str, Any]) -> None:
    """One small node: small CPU requests, images never pulled (there is no registry)."""
    if obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
        return
    spec = obj["spec"]["template"]["spec"]
    for container in spec.get("containers", []):
        container["imagePullPolicy"] = "IfNotPresent"
        requests = (container.get("resources") or {}).get("requests")
        if requests:
            requests["cpu"] = POD_CPU


def _configure(obj: dict[str, Any], cluster: Cluster) -> None:
    """Knative's settings for this node: Traefik, the queue-proxy image, tracing to the
    host's Jaeger, scale to zero in seconds (tests wait for it)."""
    if obj["kind"] != "ConfigMap":
        return
    name = obj["metadata"]["name"]
    data = obj.setdefault("data", {})
    if name == "config-deployment":
        data["queue-sidecar-image"] = cluster.image_name(SERVING[4])
        data["registries-skipping-tag-resolving"] = "dev.local"
    elif name == "config-network":
        data["ingress-class"] = "traefik.ingress.networking.knative.dev"
    elif name == "config-observability":
        data.update(
            {
                "tracing-protocol": "http/protobuf",
                "tracing-endpoint": f"http://{NODE_IP}:{POD_REACH['otlp http']}/v1/traces",
                "tracing-sampling-rate": "1",
            }
        )
    elif name == "config-autoscaler":
        data.update({"stable-window": "10s", "scale-to-zero-grace-period": "10s"})


def _missing_config_maps(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ConfigMaps Knative's release build writes and its config folders lack (the images
    of Eventing's integrations and transformations, read into the controller's environment):
    each key the Deployments read, naming an image this cluster does not have, so a
    resource needing one fails visibly while the controller starts."""
    present = {
        (o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in objects
        if o["kind"] == "ConfigMap"
    }
    wanted: dict[tuple[str, str], set[str]] = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"].get("containers", []):
            for env in container.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
                if not ref or ref.get("optional"):
                    continue
                key = (obj["metadata"].get("namespace"), ref["name"])
                if key not in present:
                    wanted.setdefault(key, set()).add(ref["key"])
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": {key: "dev.local/knative/not-built:none" for key in sorted(keys)},
        }
        for (namespace, name), keys in sorted(wanted.items())
    ]


def _traefik_services() -> list[dict[str, Any]]:
    """Traefik runs on the node, not in a pod: its Services point at the node's address."""
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "traefik"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mayfly"}},
    ]
    for name, port in (("traefik", 8081), ("traefik-private", 8082)):
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "traefik"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}]},
            }
        )
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-node",
                    "namespace": "traefik",
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [NODE_IP]}],
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            }
        )
    return objects


def _write_kubeconfig(path: Path, server: str, ca: Path, token: str) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": NETNS, "cluster": {"server": server, "certificate-authority": str(ca)}}
                ],
                "users": [{"name": NETNS, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": NETNS,
                        "context": {"cluster": NETNS, "user": NETNS, "namespace": "mayfly"},
                    }
                ],
                "current-context": NETNS,
            }
        )
    )
    path.chmod(0o600)


def _debian_release() -> tuple[str, str] | None:
    """(codename, mirror URL) of this machine's Debian, from its own apt sources."""
    try:
        release = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
    except OSError:
        return None
    codename = release.get("VERSION_CODENAME", "").strip('"')
    if release.get("ID") != "debian" or not codename:
        return None
    listed = Path("/etc/apt/sources.list.d")
    sources = [Path("/etc/apt/sources.list"), *sorted(listed.glob("*.list"))]
    sources += sorted(listed.glob("*.sources"))
    for source in sources:
        with contextlib.suppress(OSError):
            text = source.read_text()
            for stanza in text.split("\n\n"):  # deb822 .sources
                suite = re.search(rf"^Suites:.*\b{codename}\b", stanza, re.MULTILINE)
                uri = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
                if suite and uri:
                    return codename, uri.group(1)
            for line in text.splitlines():  # one-line style
                fields = line.split()
                if len(fields) >= 3 and fields[0] == "deb" and fields[2] == codename:
                    return codename, fields[1]
    return None


def _cgroup_hierarchies() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").is_file():  # cgroup v2: one tree
        return [base]
    return [
        path
        for path in sorted(base.iterdir())
        if path.is_dir() and path.name != "unified" and not path.is_symlink()
    ]


def _teardown() -> None:
    """Kill what runs in `NETNS` and under `CGROUP_ROOT` (only this service starts processes
    there), then remove both. Pods' processes are in their own network namespaces: the
    cgroups find them."""
    ip = shutil.which("ip")
    pids: set[int] = set()
    if ip is not None:
        listed = subprocess.run(
            [ip, "netns", "pids", NETNS], capture_output=True, text=True, check=False
        )
        pids |= {int(pid) for pid in listed.stdout.split() if pid.isdigit()}
    roots = [h / CGROUP_ROOT for h in _cgroup_hierarchies() if (h / CGROUP_ROOT).is_dir()]
    for _ in range(20):
        found = set(pids)
        for root in roots:
            for procs in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    found |= {int(pid) for pid in procs.read_text().split()}
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pids = set()
        time.sleep(0.1)
    for root in roots:
        for folder in sorted(
            (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()
    if ip is not None:
        subprocess.run([ip, "netns", "delete", NETNS], capture_output=True, check=False)


def _tree_digest(root: Path, parts: list[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        path = root / part
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


_CONTAINERD_TOML = """\
version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  # No CAP_SYS_RESOURCE here: never lower a process's OOM score below ours.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"""

_COREFILE = """\
.:53 {{
    bind {node}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} mayfly-cluster
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
