"""Every Redis key of a space, defined once.

All keys of a space carry the hash tag ``{<space>}`` so that a space lives on one Redis Cluster shard and one
Lua script may touch all of them. The Lua script builds the same names from the prefix it is given
(``Keys.prefix``); ``service/lua/apply.lua`` documents the suffixes it uses and mirrors the methods below.
"""

from __future__ import annotations

from dataclasses import dataclass

# Profile hash field prefixes (one hash per profile). Shared by the Lua script, the Profile API and the workers.
TRAIT = "t:"  # t:<name>   -> JSON text of the value
TRAIT_TS = "T:"  # T:<name>   -> event timestamp (ms) of that value
TRAIT_CLASS = "c:"  # c:<name>   -> "audience" | "computed_trait" (Engage-made values only)
IDENT = "x:"  # x:<type>:<value> -> "<first seen ms>|<first messageId>"
IDENT_COUNT = "n:"  # n:<type>   -> how many values of that type the profile holds
ORDER = "o:"  # o:<order key> -> "<ms>|<revenue>|<category>\x1f<category>..."
ACTIVITY = "a:"  # a:<channel>:<day> -> 48-bit integer, one bit per 30-minute slot of that UTC day
GROUP = "g:"  # g:<groupId>  -> first-seen ms
ANCESTOR = "r:"  # r:<merged profile id> -> "1": profiles merged into this one
META = "m:"  # m:fs m:ls (first/last event ms), m:fm m:lm (their messageIds), m:ca m:ua (received ms), m:merges

TOMBSTONE = "!"  # index value of a deleted userId: its later events are suppressed (see lua/apply.lua)

CHANNELS = ("web", "mobile", "email")
SLOT_MS = 30 * 60 * 1000
SLOTS_PER_DAY = 48
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Keys:
    """Key names of one space."""

    space: str

    @property
    def prefix(self) -> str:
        return f"sps:{{{self.space}}}:"

    def profile(self, pid: str) -> str:
        return f"{self.prefix}p:{pid}"

    def ident(self, kind: str, value: str) -> str:
        return f"{self.prefix}i:{kind}:{value}"

    def redirect(self, pid: str) -> str:
        return f"{self.prefix}mrg:{pid}"

    def account(self, group_id: str) -> str:
        return f"{self.prefix}acct:{group_id}"

    @property
    def seq(self) -> str:
        return f"{self.prefix}seq"

    @property
    def dirty(self) -> str:
        return f"{self.prefix}dirty"

    @property
    def log(self) -> str:
        return f"{self.prefix}log"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def suppressed(self) -> str:
        return f"{self.prefix}suppressed"

    @property
    def forgotten_profiles(self) -> str:
        """Profile ids erased by GDPR deletion whose log entries still await purging."""
        return f"{self.prefix}forgotten"

    @property
    def refresh_pending(self) -> str:
        return f"{self.prefix}refresh:pending"

    def dedupe(self, bucket: int, shard: int) -> str:
        return f"{self.prefix}dd:{bucket}:{shard:x}"


SPACES_KEY = "sps:spaces"  # set of every space that has received data (not tagged: a global index)
