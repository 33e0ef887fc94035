"""Who holds a lock: tokens that name their process (``host:pid-namespace:pid:random``), so a dead holder can be told
apart.

Locks here are redis-py ``Lock``s whose token is ``holder_token()``; an operator command that finds a lock can
clear it at once when its process is gone from this host, instead of waiting for it to lapse.
"""

from __future__ import annotations

import os
import socket
import uuid

import redis


def _pid_namespace() -> str:
    """Two containers on one host (host networking) may share a hostname but never a pid namespace."""
    try:
        return os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return "?"


def holder_token() -> str:
    """Unique like redis-py's own token, and says which process holds the lock."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def holder_is_gone(token: bytes | str | None) -> bool:
    """True when ``token`` names a process of this host and pid namespace that no longer exists (its lock only
    waits to expire). Anything else — another machine, another container, a token of an older version — is left
    to its expiry."""
    if not token:
        return False
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    parts = text.split(":")
    if len(parts) != 4 or parts[:2] != [socket.gethostname(), _pid_namespace()] or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def clear_if_gone(client: redis.Redis, key: str) -> bytes | None:
    """Delete the lock at ``key`` if its holder is gone, unless it changed meanwhile (a new holder took it the
    moment the old one lapsed). Returns the token cleared, or None."""
    with client.pipeline(transaction=True) as pipe:  # said outright: a Cluster client's pipeline is not one else
        try:
            pipe.watch(key)
            token = pipe.get(key)
            if not holder_is_gone(token):
                return None
            pipe.multi()
            pipe.delete(key)
            pipe.execute()
        except redis.WatchError:
            return None
    return token
