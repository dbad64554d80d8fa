"""Network namespaces for tests: run a command inside a private namespace with loopback and a
veth pair (10.200.0.1 <-> 10.200.0.2), so WebRTC test traffic never touches the machine's
interfaces; and :class:`Node`, a test host with an address of its own, joined to this namespace,
for the gateway as on several machines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

SETUP = ("ip link set lo up && ip link add v0 type veth peer name v1 && "
         "ip addr add 10.200.0.1/24 dev v0 && ip addr add 10.200.0.2/24 dev v1 && "
         "ip link set v0 up && ip link set v1 up")


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare and ip (util-linux, iproute2) are needed"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", SETUP], capture_output=True, timeout=20)
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.decode(errors='replace')[:200]}"
    return None


def run_python(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` inside a fresh namespace, from the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = f"{SETUP} && exec {sys.executable} -m {module} " + " ".join(args)
    return subprocess.run(["unshare", "-n", "sh", "-c", cmd], cwd=root, capture_output=True,
                          text=True, timeout=timeout)


class Node:
    """A test host of its own: network namespace ``redact-n<k>-<pid>`` joined to this one by a
    veth pair, reached at ``10.201.<k>.2`` (this side: ``10.201.<k>.1``, its default route).
    Its processes share this machine's files (a shared file system, as in a deployment)."""

    def __init__(self, k: int) -> None:
        self.k = k
        tag = f"{k}{os.getpid() % 10000}"
        self.ns = f"redact-n{tag}"
        self.host_if, self.node_if = f"rh{tag}", f"rn{tag}"
        self.address = f"10.201.{k}.2"
        self.gateway = f"10.201.{k}.1"

    @staticmethod
    def unavailable() -> str | None:
        """None when nodes can be made here (root, iproute2), else why not."""
        if shutil.which("ip") is None:
            return "ip (iproute2) is needed"
        if os.geteuid() != 0:
            return "making network namespaces needs root"
        return None

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def up(self) -> Node:
        self._ip("netns", "add", self.ns)
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.node_if)
        self._ip("link", "set", self.node_if, "netns", self.ns)
        self._ip("addr", "add", f"{self.gateway}/24", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        for cmd in (("link", "set", "lo", "up"),
                    ("addr", "add", f"{self.address}/24", "dev", self.node_if),
                    ("link", "set", self.node_if, "up"),
                    ("route", "add", "default", "via", self.gateway)):
            self._ip("-n", self.ns, *cmd)
        return self

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``args`` on this node."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *args], **kwargs)

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)
