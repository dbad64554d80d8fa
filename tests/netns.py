"""Run a command inside a private network namespace with loopback and a veth pair
(10.200.0.1 <-> 10.200.0.2), so WebRTC test traffic never touches the machine's interfaces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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
