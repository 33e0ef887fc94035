"""Move a space to another primary of a Redis Cluster while events flow: ``persona-sync move-space``.

Every key of a space shares one hash slot, so a space moves as one slot. Redis's own resharding
(``redis-cli --cluster reshard``) migrates a slot's keys a few at a time, and the apply script reads keys it
cannot declare in advance (the profile an identifier points to): between two batches it would run on the node
that holds its declared keys and find the others gone, and build a second profile or miss a merge. So the keys
move in one script on the source primary (``CLUSTER SETSLOT ... MIGRATING``, then ``CLUSTER GETKEYSINSLOT`` and
``MIGRATE ... KEYS`` in batches, inside that one call): scripts run wholly before it, on a slot not yet migrating,
or wholly after it. (On a migrating slot that still holds its keys, a script is refused every key it has not
created yet, as "non local"; the receiver answers that 503, for Segment to retry.) After it the source answers
ASK for the slot, the clients retry on the target (redis-py follows ASK, then MOVED once the slot is assigned),
and nothing is lost or applied twice. https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#live-resharding

The source serves nothing else while the keys move: a space's move stalls every space on that primary for its
duration (measured: BENCHMARKS.md, "Moving a space"). Past ``lua-time-limit`` (5 s by default) the node answers
BUSY, which the receiver turns into 503, and Segment retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster

from service.spec.keys import Keys

# Marks the slot (ARGV[1]) migrating to the node ARGV[6] and moves every key of it to host ARGV[2]:ARGV[3], ARGV[4]
# keys per MIGRATE, each with an I/O timeout of ARGV[5] ms; returns how many moved. Run on the source primary, with
# no keys (it routes nothing).
MOVE_SLOT = """
redis.call('CLUSTER', 'SETSLOT', ARGV[1], 'MIGRATING', ARGV[6])
local moved = 0
while true do
  local keys = redis.call('CLUSTER', 'GETKEYSINSLOT', ARGV[1], ARGV[4])
  if #keys == 0 then return moved end
  redis.call('MIGRATE', ARGV[2], ARGV[3], '', 0, ARGV[5], 'KEYS', unpack(keys))
  moved = moved + #keys
end
"""
BATCH = 1000  # keys per MIGRATE (Lua's unpack takes a few thousand values at most)


class MoveError(RuntimeError):
    """The move cannot start (not a Cluster, no such node); the message says what to do."""


@dataclass(frozen=True)
class Moved:
    space: str
    slot: int
    source: str
    target: str
    keys: int
    seconds: float


def _node_client(node: ClusterNode) -> redis.Redis:
    return cast(redis.Redis, node.redis_connection)


def move_space(client: redis.Redis, space: str, target: str, io_timeout_ms: int = 60_000) -> Moved:
    """Move ``space``'s slot to the primary ``target`` ("host:port")."""
    if not isinstance(client, RedisCluster):
        raise MoveError("REDIS_CLUSTER is not set: a standalone Redis holds every space already")
    cluster = cast(Any, client)
    anchor = Keys(space).log
    slot = cluster.keyslot(anchor)
    source = cluster.get_node_from_key(anchor)
    dest = cluster.get_node(node_name=target)
    primaries = cluster.get_primaries()
    if dest is None or dest.name not in {n.name for n in primaries}:
        names = ", ".join(sorted(n.name for n in primaries))
        raise MoveError(f"{target} is not a primary of this cluster; the primaries are {names}")
    started = time.perf_counter()
    if dest.name == source.name:
        return Moved(space, slot, source.name, dest.name, 0, 0.0)
    src, dst = _node_client(source), _node_client(dest)
    source_id, dest_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    # the order Redis documents: importing on the target first, so that no ASK lands on a node not expecting it;
    # then migrating and the keys' move in one script
    dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    moved = int(src.eval(MOVE_SLOT, 0, slot, dest.host, dest.port, BATCH, io_timeout_ms, dest_id))
    for node in [dest, source, *(n for n in primaries if n.name not in (dest.name, source.name))]:
        _node_client(node).execute_command("CLUSTER SETSLOT", slot, "NODE", dest_id)
    cluster.nodes_manager.initialize()  # this client's own routing; the others follow the MOVED replies
    return Moved(space, slot, source.name, dest.name, moved, round(time.perf_counter() - started, 3))


def owner(client: redis.Redis, space: str) -> str:
    """The primary ("host:port") that holds ``space`` on a Cluster."""
    return str(cast(Any, client).get_node_from_key(Keys(space).log).name)
