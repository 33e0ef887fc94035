"""One-off renames of keys whose names changed between versions, run at start-up by the web and the worker."""

from __future__ import annotations

import redis

from service.spec.keys import LEGACY_GLOBAL_KEYS
from service.state.connect import is_cluster


def rename_legacy_keys(client: redis.Redis) -> list[str]:
    """Give the global keys of an older version their tagged names (``LEGACY_GLOBAL_KEYS``): the list of known
    spaces, the refusal log, Mavera's limiter and pause. A key already under its new name is left alone. Returns
    the renamed names. A Cluster never held the old names, and could not rename across slots anyway."""
    if is_cluster(client):
        return []
    renamed = []
    for old, new in LEGACY_GLOBAL_KEYS.items():
        try:
            if client.renamenx(old, new):
                renamed.append(old)
        except redis.ResponseError:  # "no such key": nothing to upgrade
            pass
    return renamed
