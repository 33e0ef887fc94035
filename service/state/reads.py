"""Profile reads in one round trip: the Profile API resolves an identifier, follows merges and reads the profile
in one read-only script call, instead of three to five calls in turn (the space's generation, the identifier,
the profile, a redirect per merge). Under ingest each round trip waits behind other work, so fewer of them is
what keeps a read's tail short."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aredis
from redis.commands.core import AsyncScript

from service.spec.keys import TOMBSTONE, Keys

# KEYS: the space's generation key (declared so that Redis Cluster routes the call to the space's shard).
# ARGV: prefix, identifier type ('segment_id': the value is a profile id), value, tombstone.
# Returns {generation, profile id, field, value, field, value, ...}, or {} when nothing live answers to the
# identifier: the generation it was read from, so that the reads that follow (its /events index) use the same one
# even if a rebuild switches meanwhile.
FIND = """
local P, kind, value = ARGV[1], ARGV[2], ARGV[3]
local gen = redis.call('GET', KEYS[1]) or ''
local G = P .. gen
local pid = value
if kind ~= 'segment_id' then pid = redis.call('GET', G .. 'i:' .. kind .. ':' .. value) end
for _ = 1, 101 do   -- a merged-away id points at its survivor; older chains are at most the merge cap long
  if not pid or pid == ARGV[4] then return {} end
  local fields = redis.call('HGETALL', G .. 'p:' .. pid)
  if #fields > 0 then
    table.insert(fields, 1, pid)
    table.insert(fields, 1, gen)
    return fields
  end
  pid = redis.call('GET', G .. 'mrg:' .. pid)
end
return {}
"""


class ProfileReader:
    """The Profile API's reads of one web process (the script is loaded once, then called by its digest)."""

    def __init__(self, client: aredis.Redis) -> None:
        self._find: AsyncScript = client.register_script(FIND)

    async def find(self, space: str, kind: str, value: str) -> tuple[str, dict[bytes, Any], str] | None:
        """The live profile (id, hash, and the generation it is in) that ``kind:value`` (already normalised)
        resolves to, following merges."""
        keys = Keys(space)
        reply = await self._find(keys=[keys.generation_key], args=[keys.prefix, kind, value, TOMBSTONE])
        if not reply:
            return None
        gen, pid = reply[0].decode(), reply[1].decode()
        return pid, dict(zip(reply[2::2], reply[3::2], strict=True)), gen
