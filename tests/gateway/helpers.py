"""The gateway process for tests and benchmarks, and virsh as a subprocess."""

from __future__ import annotations

import os
import subprocess

from tests.gateway.rawclient import wait_for_gateway
from tests.procs import Cluster, Proc


class GatewayProc(Proc):
    """`virtbroker libvirt-gateway` on a cluster's state dir; ready when it answers AUTH_LIST."""

    def __init__(self, cluster: Cluster, extra: list[str] = ()):
        argv = cluster._argv("libvirt-gateway", *extra)
        super().__init__("libvirt-gateway", argv, cluster.state_dir)
        self.path = f"{cluster.state_dir}/libvirt-sock"
        self.ro_path = self.path + "-ro"
        self.uri = f"qemu+unix:///system?socket={self.path}"
        self.ro_uri = f"qemu+unix:///system?socket={self.ro_path}"

    def start(self) -> GatewayProc:
        super().start()
        wait_for_gateway(self.path, self.alive)
        return self


def start_gateway(cluster: Cluster, extra: list[str] = ()) -> GatewayProc:
    proc = GatewayProc(cluster, extra).start()
    cluster.workers["libvirt-gateway"] = proc  # stopped with the cluster, logs in cluster.logs()
    return proc


def virsh(uri: str, *args: str, timeout_s: float = 120.0, check: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C")
    result = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=timeout_s, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: rc {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
