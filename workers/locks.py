"""A Redis lock that lives as long as its holder works on: redis-py's ``Lock`` (token-checked) renewed by a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock


@contextmanager
def held_lock(client: redis.Redis, key: str, ttl: float) -> Iterator[Lock | None]:
    """A lock that its holder renews every ``ttl / 3`` while it works: a create that waits on the rate limit keeps
    it however long that takes, and a killed holder's lock lapses within ``ttl``.
    Yields None when another holder has it; a holder checks ``owned()`` before anything that needs it."""
    lock = client.lock(key, timeout=ttl, blocking=False, thread_local=False)
    if not lock.acquire():
        yield None
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                lock.reacquire()
            except LockNotOwnedError:  # lapsed: the holder sees it through ``owned()``
                return
            except redis.RedisError:  # a blip: keep trying while the lock may still be ours
                continue

    renewer = threading.Thread(target=renew, name=f"renew {key}", daemon=True)
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        try:
            lock.release()
        except (LockError, redis.RedisError):  # lapsed, or Redis unreachable: it expires on its own
            pass
