"""The embedded redis-server launcher and the DATA_DIR lock: one directory, one server, one stack."""

from __future__ import annotations

import pytest
import redis

from service.devstack.redis_server import DataDirLock, EmbeddedRedis
from tests.drills.stack import short_tmpdir


def test_a_socket_a_live_server_answers_on_is_never_taken_over() -> None:
    d = short_tmpdir()
    with EmbeddedRedis(d, persistent=False) as first:
        with pytest.raises(RuntimeError, match="already answers"):
            EmbeddedRedis(d, persistent=False).start()
        assert redis.Redis.from_url(first.url).ping()  # its socket is still there and still answers
    with EmbeddedRedis(d, persistent=False) as again:  # a stale socket file (server gone) is replaced
        assert redis.Redis.from_url(again.url).ping()


def test_the_data_dir_lock_is_exclusive_and_names_its_holder() -> None:
    d = short_tmpdir()
    first = DataDirLock(d, "http://127.0.0.1:8000")
    assert first.acquire() is None
    holder = DataDirLock(d, "http://127.0.0.1:8001").acquire()
    assert holder is not None and "http://127.0.0.1:8000" in holder
    first.release()
    second = DataDirLock(d, "http://127.0.0.1:8001")
    assert second.acquire() is None  # released (or its process died): free again
    second.release()
