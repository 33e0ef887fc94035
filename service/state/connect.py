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

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelConnectionPool
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool, SentinelManagedConnection

from service.config import SentinelTarget, Settings, is_sentinel, parse_sentinel_url, queue_url, state_url


def connect(url: str, *, cluster: bool = False, **options: Any) -> redis.Redis:
    """A blocking client for ``url``: standalone, Sentinel primary, or (``cluster``) a Redis Cluster."""
    if cluster:
        return cast(redis.Redis, RedisCluster.from_url(url, **options))
    if is_sentinel(url):
        t = parse_sentinel_url(url)
        sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t, options), **options)
        return sentinel.master_for(t.service, db=t.db, username=t.username, password=t.password,
                                   connection_pool_class=CheckedSentinelPool, connection_class=SentinelConnection,
                                   sentinel_url=_without_userinfo(url))
    return redis.Redis.from_url(url, **options)


def connect_async(url: str, *, cluster: bool = False, **options: Any) -> aredis.Redis:
    """The asyncio twin of ``connect`` (the web's client)."""
    if cluster:
        return cast(aredis.Redis, AsyncRedisCluster.from_url(url, **options))
    if is_sentinel(url):
        t = parse_sentinel_url(url)
        sentinel = AsyncSentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t, options, asyncio=True),
                                 **options)
        client = sentinel.master_for(t.service, db=t.db, username=t.username, password=t.password,
                                     connection_pool_class=AsyncCheckedSentinelPool)
    else:
        client = aredis.Redis.from_url(url, **options)
    pack_with_hiredis(client.connection_pool)
    return client


class HiredisPacking:
    """Packs commands with hiredis' C packer, as redis-py's blocking connections already do; its asyncio ones
    pack in Python, ~9 µs per event of an apply call of 100 events against ~1.4 µs (timeit, 2026-11-24). Mixed
    into the pool's own connection class, so TCP, unix socket, TLS and Sentinel connections all keep their own
    behaviour."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):  # a command name of several words ('CONFIG GET') goes as several arguments
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(cast(Any, tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a
                                                         for a in args)))]
        except TypeError as exc:  # what redis-py's own packer says of a value it cannot send
            raise redis.DataError(str(exc)) from exc


def pack_with_hiredis(pool: aredis.ConnectionPool) -> None:
    """Let ``pool``'s connections pack with hiredis (a dependency: ``redis[hiredis]``)."""
    if issubclass(pool.connection_class, HiredisPacking):
        return
    base = pool.connection_class
    pool.connection_class = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})


def _sentinel_kwargs(t: SentinelTarget, options: dict[str, Any], asyncio: bool = False) -> dict[str, Any]:
    """The sentinels get the timeouts of the data connections, their own password if one is given, and no retry:
    a sentinel that does not answer is passed over for the next one at once (redis-py would otherwise retry the
    same one with back-off before asking the next)."""
    kwargs: dict[str, Any] = {k: v for k, v in options.items() if k in ("socket_timeout", "socket_connect_timeout")}
    kwargs["retry"] = (AsyncRetry if asyncio else Retry)(backoff=NoBackoff(), retries=0)
    if t.sentinel_password:
        kwargs["password"] = t.sentinel_password
    return kwargs


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


PRIMARY_CHECK_EVERY = 1.0  # seconds between two checks of which primary the sentinels name


class CheckedSentinelPool(SentinelConnectionPool):
    """A pool of connections to the primary that also asks the sentinels which primary that is, once a second,
    rather than only when it opens a connection. redis-py's pool reuses an open connection for as long as it works,
    and a connection to a primary that is still up after a failover (``SENTINEL FAILOVER``, a partition that left
    it reachable from here) does work — until the sentinels demote it and it drops everything written to it in
    between. Once the sentinels name another primary, idle connections are closed and busy ones on their return."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + PRIMARY_CHECK_EVERY
            with contextlib.suppress(MasterNotFoundError):  # no primary named: new connections fail, as they should
                self.get_master_address()
        return super().get_connection(*args, **kwargs)


class AsyncCheckedSentinelPool(AsyncSentinelConnectionPool):
    """The asyncio twin of ``CheckedSentinelPool``. The check runs beside the requests (a sentinel that does not
    answer must not hold one up); a connection that still points at the previous primary is reopened — to the one
    the sentinels name — before it is handed out."""

    def __init__(self, service_name: str, sentinel_manager: AsyncSentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0
        self._check: asyncio.Task | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._next_check and (self._check is None or self._check.done()):
            self._next_check = now + PRIMARY_CHECK_EVERY
            self._check = asyncio.ensure_future(self._check_primary())
        return await super().get_connection(*args, **kwargs)

    async def _check_primary(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.get_master_address()

    async def ensure_connection(self, connection: Any) -> None:
        if self.master_address is not None and connection.is_connected \
                and (connection.host, connection.port) != self.master_address:
            await connection.disconnect()  # connecting again asks the sentinels
        await super().ensure_connection(connection)


class SentinelConnection(SentinelManagedConnection):
    """A connection to the primary a Sentinel names that can also be rebuilt from its class and plain keyword
    arguments — what a forked process does to open connections of its own (the recompute's process pool, RQ's
    scheduler): ``sentinel_url`` (the URL without the data nodes' credentials, which are ``username`` and
    ``password``) finds the sentinels again when the pool that built the original is not at hand."""

    def __init__(self, **kwargs: Any) -> None:
        url = kwargs.pop("sentinel_url")
        if "connection_pool" not in kwargs:
            kwargs["connection_pool"] = _primary_pool(url, kwargs)
        super().__init__(**kwargs)


_pools: dict[tuple, SentinelConnectionPool] = {}
_pools_lock = threading.Lock()


def _primary_pool(url: str, kwargs: dict[str, Any]) -> SentinelConnectionPool:
    """The Sentinel pool of this process for ``url`` and these credentials (it asks the sentinels where the
    primary is); one per process, kept for the process's life."""
    options = {k: v for k, v in kwargs.items() if k in ("socket_timeout", "socket_connect_timeout")}
    key = (url, kwargs.get("db", 0), kwargs.get("username"), kwargs.get("password"), tuple(sorted(options.items())))
    with _pools_lock:
        if key not in _pools:
            t = parse_sentinel_url(url)
            sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=_sentinel_kwargs(t, options), **options)
            _pools[key] = CheckedSentinelPool(t.service, sentinel, db=kwargs.get("db", 0),
                                              username=kwargs.get("username"), password=kwargs.get("password"),
                                              **options)
        return _pools[key]


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
