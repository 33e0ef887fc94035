"""A Redis lock that lives as long as its holder works on: redis-py's ``Lock`` (token-checked) renewed by a thread.

Locks are short (seconds) and renewed while held, so a holder that dies — SIGKILL, OOM, a lost machine — stops
blocking everyone else within one ``ttl``, while a holder that works for an hour keeps its lock the whole time.
The token names the holder (``service.state.holders``) so that an operator can tell a live holder from a dead one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from service.state.holders import holder_token


@contextmanager
def held_lock(client: redis.Redis, key: str, ttl: float, wait: float = 0.0) -> Iterator[Lock | None]:
    """A lock that its holder renews every ``ttl / 3`` while it works: a create that waits on the rate limit keeps
    it however long that takes, and a killed holder's lock lapses within ``ttl``. Waits up to ``wait`` seconds
    for another holder to finish. Yields None when another holder kept it; a holder checks ``owned()`` before
    anything that needs it."""
    lock = client.lock(key, timeout=ttl, sleep=0.1, blocking=wait > 0, blocking_timeout=wait or None,
                       thread_local=False)
    if not lock.acquire(token=holder_token()):
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
