"""Who holds a lock: tokens that name their process (``host:pid:random``), so a dead holder can be told apart.

Locks here are redis-py ``Lock``s whose token is ``holder_token()``; an operator command that finds a lock can
clear it at once when its process is gone from this host, instead of waiting for it to lapse.
"""

from __future__ import annotations

import os
import socket
import uuid


def holder_token() -> str:
    """Unique like redis-py's own token, and says which process holds the lock."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def holder_is_gone(token: bytes | str | None) -> bool:
    """True when ``token`` names a process of this host that no longer exists (its lock only waits to expire)."""
    if not token:
        return False
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    host, _, rest = text.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's process (or a token of an older version): only its expiry tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False
