"""Profile state on a real Redis Cluster: spaces on different shards ingest side by side, and a space moves to
another primary while its events flow (``persona-sync move-space``), losing and doubling nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
from redis.crc import key_slot

from service.config import Settings
from service.devstack.cluster import LocalCluster
from service.http.app import create_app
from service.spec.keys import Keys
from service.state.connect import connect
from service.state.reshard import owner
from service.state.store import Applier
from tests.conftest import LiveServer
from tests.helpers import profiles

EXE = str(Path(sys.executable).with_name("persona-sync"))
T = "2026-03-01T00:00:00.000Z"


def events(space: str, start: int, n: int, users: int) -> list[dict]:
    """For user ``i % users``: an identify tying an anonymousId and an email to the userId, then orders. A user's
    events straddle any moment of the run, so state read half-moved would split or lose a profile."""
    out = []
    for i in range(start, start + n):
        u = i % users
        if i < users:
            out.append({"type": "identify", "userId": f"{space}-u{u}", "anonymousId": f"{space}-a{u}",
                        "messageId": f"{space}-m{i}", "timestamp": T, "traits": {"email": f"{u}@{space}.example"}})
        else:
            out.append({"type": "track", "event": "Order Completed", "anonymousId": f"{space}-a{u}",
                        "messageId": f"{space}-m{i}", "timestamp": T,
                        "properties": {"order_id": f"{space}-o{i}", "revenue": 10}})
    return out


class Sender(threading.Thread):
    """Posts batches of 20 to one space like Segment does: a batch refused (503), or not answered in time (on a
    busy machine), is sent again until taken; ``sent`` counts the events acknowledged."""

    def __init__(self, url: str, space: str, users: int = 40) -> None:
        super().__init__(daemon=True)
        self.url, self.space, self.users = url, space, users
        self.sent = 0
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.stop.is_set():
                batch = events(self.space, self.sent, 20, self.users)
                while not self._taken(http, batch):
                    self.refused += 1
                    time.sleep(0.05)
                self.sent += len(batch)

    def _taken(self, http: httpx.Client, batch: list[dict]) -> bool:
        try:
            return http.post(f"/segment/{self.space}", json=batch).status_code == 200
        except httpx.TimeoutException:  # applied or not: sent again, it is applied once (dedupe by messageId)
            return False

    def wait_for(self, n: int, seconds: float = 120) -> None:
        """Until ``n`` events are acknowledged; fails, rather than hanging, if intake stops."""
        deadline = time.monotonic() + seconds
        while self.sent < n:
            assert self.is_alive() and time.monotonic() < deadline, (
                f"{self.sent} of {n} events acknowledged, {self.refused} refusals")
            time.sleep(0.02)


def check(client: redis.Redis, space: str, sent: int, users: int) -> None:
    """Every acknowledged event applied once: one profile per user, each holding its orders exactly."""
    keys = Keys(space)
    assert client.xlen(keys.log) == sent
    found = profiles(client, space)
    assert len(found) == users
    orders = Counter({next(i.value for i in p.identifiers if i.type == "user_id"): len(p.orders) for p in found})
    expected = Counter(f"{space}-u{i % users}" for i in range(users, sent))
    assert orders == expected


def spaces_on_each_node(cluster: LocalCluster, client: redis.Redis) -> list[str]:
    """One space name per primary."""
    wanted = {n.name for n in client.get_primaries()}  # type: ignore[attr-defined]
    chosen: dict[str, str] = {}
    for i in range(1000):
        name = f"shop{i}"
        node = client.get_node_from_key(Keys(name).log).name  # type: ignore[attr-defined]
        chosen.setdefault(node, name)
        if set(chosen) == wanted:
            return list(chosen.values())
    raise AssertionError("no space name found for every primary")


def test_three_spaces_on_three_shards_ingest_concurrently(redis_cluster: LocalCluster) -> None:
    redis_cluster.flush()
    client = connect(redis_cluster.url, cluster=True)
    spaces = spaces_on_each_node(redis_cluster, client)
    settings = Settings(redis_cluster=True)
    with LiveServer(create_app(settings, redis_cluster.url, "")) as server:
        senders = [Sender(server.url, space) for space in spaces]
        for s in senders:
            s.start()
        deadline = time.monotonic() + 30
        while min(s.sent for s in senders) < 400 and time.monotonic() < deadline:
            time.sleep(0.05)
        for s in senders:
            s.stop.set()
            s.join(15)
    for s in senders:
        check(client, s.space, s.sent, s.users)
    assert len({owner(client, space) for space in spaces}) == 3
    for space in spaces:  # each space's keys on its own node only
        slot = key_slot(Keys(space).log.encode())
        counts = [redis_cluster.node(n).execute_command("CLUSTER COUNTKEYSINSLOT", slot)
                  for n in range(len(redis_cluster.ports))]
        assert sorted(counts)[:2] == [0, 0] and max(counts) > 0, (space, counts)


def _half_migrated(client: redis.Redis, space: str) -> tuple[redis.Redis, redis.Redis, int]:
    """Mark ``space``'s slot migrating from its primary to another, moving no key: the state a slot is in while
    ``redis-cli --cluster reshard`` moves its keys a few at a time. Returns (source, target, slot)."""
    anchor = Keys(space).log
    slot = key_slot(anchor.encode())
    source = client.get_node_from_key(anchor)  # type: ignore[attr-defined]
    target = next(n for n in client.get_primaries() if n.name != source.name)  # type: ignore[attr-defined]
    src, dst = source.redis_connection, target.redis_connection
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER MYID"))
    src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER MYID"))
    return src, dst, slot


@pytest.mark.parametrize("known_space", [False, True], ids=["call-refused", "event-refused-after-its-dedupe-record"])
def test_events_meeting_a_half_migrated_slot_are_refused_for_a_retry_not_kept_as_dead_letters(
        redis_cluster: LocalCluster, known_space: bool) -> None:
    """Keys an event needs but the source no longer (or not yet) holds are refused by Redis as "non local": the
    request is answered 503, no event goes to the dead letters, and once the slot is stable the retry applies every
    event (none is taken for a duplicate of itself)."""
    redis_cluster.flush()
    client = connect(redis_cluster.url, cluster=True)
    space = "halfway"
    keys = Keys(space)
    settings = Settings(redis_cluster=True, dedupe_shards=1)
    with LiveServer(create_app(settings, redis_cluster.url, "")) as server, \
            httpx.Client(base_url=server.url, timeout=10) as http:
        # one invalid event: the space has a dead letter already, so that keeping more would succeed
        first = http.post(f"/segment/{space}", json=[*events(space, 0, 20, 20), {"type": "identify"}])
        assert first.status_code == 200 and first.json()["rejected"] == 1, first.text
        if known_space:  # the keys read once per call exist, so the script gets to the events themselves
            client.set(keys.generation_key, "")
            client.set(keys.dedupe_sets_since, "-")
            client.hset(f"{keys.prefix}deleted", "someone-else", "1")
            bucket = int(time.time()) // Applier(settings).bucket_width
            for b in range(bucket - 3, bucket + 3):  # every dedupe bucket the call may read: the record is written
                client.sadd(keys.dedupe(b, 0), 1)
        src, dst, slot = _half_migrated(client, space)
        try:
            later = events(space, 20, 20, 40)  # 20 new users: their identifier keys do not exist yet
            refused = http.post(f"/segment/{space}", json=later)
            assert refused.status_code == 503, refused.text
            assert client.xlen(keys.log) == 20
            assert client.xlen(keys.dead_letters) == 1
        finally:
            for node in (src, dst):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
        retried = http.post(f"/segment/{space}", json=later)
        assert retried.status_code == 200 and retried.json()["accepted"] == 20, retried.text
    assert client.xlen(keys.log) == 40
    assert client.xlen(keys.dead_letters) == 1
    assert len(profiles(client, space)) == 40


def test_a_space_moves_to_another_primary_while_its_events_flow(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path).start()
    try:
        client = connect(cluster.url, cluster=True)
        space = "default"
        before = owner(client, space)
        target = next(n.name for n in client.get_primaries() if n.name != before)  # type: ignore[attr-defined]
        env = {"PATH": "/usr/bin:/bin", "REDIS_URL": cluster.url, "REDIS_CLUSTER": "true",
               "QUEUE_REDIS_URL": "redis://127.0.0.1:1/0"}  # the move never touches the queue
        with LiveServer(create_app(Settings(redis_cluster=True), cluster.url, "")) as server:
            sender = Sender(server.url, space)
            sender.start()
            sender.wait_for(600)
            out = subprocess.run([EXE, "move-space", "--space", space, "--to", target], capture_output=True,
                                 text=True, timeout=120, env=env)
            at_move = sender.sent
            assert out.returncode == 0, out.stdout + out.stderr
            sender.wait_for(at_move + 600)  # events go on after the move, through ASK then MOVED
            sender.stop.set()
            sender.join(15)
        assert f"moved from {before} to {target}" in out.stdout
        assert owner(connect(cluster.url, cluster=True), space) == target  # a fresh client reads the new layout
        check(client, space, sender.sent, sender.users)
        where = subprocess.run([EXE, "move-space", "--space", space], capture_output=True, text=True, timeout=60,
                               env=env)
        assert f"{space} is on {target}" in where.stdout
    finally:
        cluster.stop()
