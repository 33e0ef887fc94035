"""The web's asyncio client packs commands with hiredis, byte for byte as redis-py's own packer does."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio.connection import Connection

from service.devstack.redis_server import EmbeddedRedis
from service.state.connect import HiredisPacking, connect_async

COMMANDS = [
    ("EVALSHA", "a" * 40, 1, "{s}:log", "header\t1\t2", b"\x00\xff\t binary", 17, -3, "é ünïcode"),
    ("CONFIG GET", "maxmemory"),
    (b"SET", b"k", memoryview(b"view")),
    ("ZADD", "z", 1.5, "member"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_hiredis_packing_matches_redis_py(args: tuple) -> None:
    assert HiredisPacking().pack_command(*args) == [b"".join(Connection().pack_command(*args))]


def test_the_web_client_packs_with_hiredis_and_round_trips(redis_server: EmbeddedRedis) -> None:
    async def go() -> None:
        client = connect_async(redis_server.url)
        assert issubclass(client.connection_pool.connection_class, HiredisPacking)
        try:
            await client.set("pack:k", b"\x00\xff\t value")
            assert await client.get("pack:k") == b"\x00\xff\t value"
            pipe = client.pipeline(transaction=False)
            pipe.hset("pack:h", mapping={"n": 7, "f": 0.25, "s": "ünï"})
            pipe.hgetall("pack:h")
            assert (await pipe.execute())[1] == {b"n": b"7", b"f": b"0.25", b"s": "ünï".encode()}
            assert "maxmemory" in await client.config_get("maxmemory")  # a command name of two words
        finally:
            await client.delete("pack:k", "pack:h")
            await client.aclose()

    asyncio.run(go())
