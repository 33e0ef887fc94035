"""Redis clients for the two roles, built from configuration alone: one place that knows the deployment's shape.

- STATE (``REDIS_URL``): a standalone Redis, a Sentinel-monitored primary (``redis+sentinel://`` URL), or with
  ``REDIS_CLUSTER=true`` the seed node of a Redis Cluster. Every key of a space carries the hash tag ``{<space>}``
  and the global keys one of their own (``service/spec/keys.py``), so each space lives in one slot: its scripts,
  transactions and scans all go to the one primary that owns it.
- QUEUE (``QUEUE_REDIS_URL``, else STATE): RQ needs a standalone Redis or a Sentinel-monitored primary; it cannot
  use a Cluster (https://python-rq.org/docs/connections/).

A Cluster client is returned under the ``redis.Redis`` type: redis-py's ``RedisCluster`` offers the same commands,
pipelines (transactions included, when their keys share a slot) and scripts, routed by key.

Sentinel URLs: ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<service name>[/<db>]``. The password
is the data nodes'; ``?sentinel_password=`` gives the sentinels' own if they require one. Sentinels are asked for
the current primary on every new connection, so after a failover the clients reconnect to the promoted replica
(https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from service.config import ConfigError, Settings, queue_url, state_url

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """A Sentinel URL -> where the sentinels are, which primary to ask them for, and the credentials."""
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    sentinels = []
    for host in filter(None, hosts.split(",")):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "26379")
        try:
            sentinels.append((name.strip("[]") or "localhost", int(port)))
        except ValueError:
            raise ConfigError(f"{host!r} in a Sentinel URL: expected host:port") from None
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError("Sentinel URL: expected redis+sentinel://[:password@]host:26379[,host:26379...]/"
                          "<service name>[/<db>], e.g. redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster/0")
    query = parse_qs(parts.query)
    return SentinelTarget(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                          unquote(user) or None, unquote(password) or None,
                          query.get("sentinel_password", [None])[0])


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def connect(url: str, *, cluster: bool = False, **options: Any) -> redis.Redis:
    """A blocking client for ``url``: standalone, Sentinel primary, or (``cluster``) a Redis Cluster."""
    if cluster:
        return cast(redis.Redis, RedisCluster.from_url(url, **options))
    if is_sentinel(url):
        t = parse_sentinel_url(url)
        sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t, options), **options)
        return sentinel.master_for(t.service, db=t.db, username=t.username, password=t.password)
    return redis.Redis.from_url(url, **options)


def connect_async(url: str, *, cluster: bool = False, **options: Any) -> aredis.Redis:
    """The asyncio twin of ``connect`` (the web's client)."""
    if cluster:
        return cast(aredis.Redis, AsyncRedisCluster.from_url(url, **options))
    if is_sentinel(url):
        t = parse_sentinel_url(url)
        sentinel = AsyncSentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t, options), **options)
        return sentinel.master_for(t.service, db=t.db, username=t.username, password=t.password)
    return aredis.Redis.from_url(url, **options)


def _sentinel_kwargs(t: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    """The sentinels get the timeouts of the data connections, and their own password if one is given."""
    kwargs = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    if t.sentinel_password:
        kwargs["password"] = t.sentinel_password
    return kwargs


def state_client(settings: Settings, **options: Any) -> redis.Redis:
    return connect(state_url(settings), cluster=settings.redis_cluster, **options)


def async_state_client(settings: Settings, url: str | None = None, **options: Any) -> aredis.Redis:
    return connect_async(url or state_url(settings), cluster=settings.redis_cluster, **options)


def queue_client(settings: Settings, **options: Any) -> redis.Redis:
    """RQ's Redis; never a Cluster (``Settings`` refuses REDIS_CLUSTER without a separate QUEUE_REDIS_URL)."""
    return connect(queue_url(settings), **options)


class OnDemand:
    """A blocking client built on first use (and again if building it failed): a Cluster client reads the
    topology as it is built, and the web must start, and answer 503, while the cluster is unreachable."""

    def __init__(self, factory: Callable[[], redis.Redis]) -> None:
        self._factory = factory
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def __call__(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def is_cluster(client: object) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def scan_space(client: redis.Redis, tagged_key: str, match: str, count: int = 2000) -> Iterator[bytes]:
    """SCAN for ``match`` among a space's keys; on a Cluster only the primary that owns ``tagged_key``'s slot is
    asked (every key of the space lives there), rather than every node."""
    if is_cluster(client):
        node = cast(RedisCluster, client).get_node_from_key(tagged_key)
        cursor = 0
        while True:
            cursors, batch = cast(Any, client).scan(cursor, match=match, count=count, target_nodes=node)
            yield from batch
            cursor = cursors[node.name]
            if not cursor:
                return
    yield from client.scan_iter(match=match, count=count)


async def scan_space_async(client: aredis.Redis, tagged_key: str, match: str, count: int = 2000
                           ) -> AsyncIterator[bytes]:
    """The asyncio twin of ``scan_space``."""
    if is_cluster(client):
        node = cast(AsyncRedisCluster, client).get_node_from_key(tagged_key)
        cursor = 0
        while True:
            cursors, batch = await cast(Any, client).scan(cursor, match=match, count=count, target_nodes=node)
            for key in batch:
                yield key
            cursor = cursors[node.name]
            if not cursor:
                return
    async for key in client.scan_iter(match=match, count=count):
        yield key
