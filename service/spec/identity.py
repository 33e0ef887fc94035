"""Identity-resolution rules, as Segment Unify applies them: normalisation, blocked values, priority and limits
(https://segment.com/docs/unify/identity-resolution/).

Pure. The matching itself runs inside the Lua script (``service/state/lua/apply.lua``) so that match, create and merge
are atomic with the event's effects; this module prepares its inputs and the rule table it is given.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:  # config imports nothing from here, but keep the pure room free of import cycles
    from service.config import Settings


# the identifier types Segment promotes itself, each from its own place in a call
# (https://segment.com/docs/unify/identity-resolution/externalids/)
BUILT_IN = frozenset({"user_id", "anonymous_id", "email", "ga_client_id", "group_id", "ios.id", "ios.idfa",
                      "ios.push_token", "android.id", "android.idfa", "android.push_token"})


@dataclass(frozen=True)
class IdentityRules:
    priority: tuple[str, ...] = ("user_id", "email")
    limits: Mapping[str, int] | None = None
    windows: Mapping[str, int] | None = None  # type -> sliding window (ms) its limit counts values added in
    blocked: tuple[str, ...] = (r"^[0-]*$", r"^-1$", r"^null$", r"^anonymous$", r"^undefined$")
    max_merges: int = 100
    max_identifiers: int = 1000
    alias_merges: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "_blocked_re", re.compile("|".join(f"(?:{p})" for p in self.blocked) or "(?!)", re.I))
        object.__setattr__(self, "_rank", {t: i for i, t in enumerate(self.priority)})
        named = dict.fromkeys([*self.priority, *(self.limits or {})])
        object.__setattr__(self, "custom", tuple(t for t in named if t not in BUILT_IN and t != "*"))

    custom: tuple[str, ...] = field(init=False, default=())
    """Identifier types of the space's own, named in the priority or the limits (a phone number, a CRM id): read
    from ``properties`` and ``context.traits`` by name too, as Segment reads a configured custom externalID."""

    def limit(self, kind: str) -> int:
        limits = self.limits or {"user_id": 1, "*": 5}
        return limits.get(kind, limits.get("*", 5))

    def usable(self, value: str | None) -> str | None:
        """The value, trimmed, or None when it is a blocked placeholder such as 'anonymous' or '0000'."""
        if value is None:
            return None
        value = value.strip()
        if not value or self._blocked_re.search(value):  # type: ignore[attr-defined]
            return None
        return value

    def sort_key(self, ident: tuple[str, str]) -> tuple[int, str, str]:
        """Highest priority first; types without a configured rank follow alphabetically."""
        return (self._rank.get(ident[0], len(self.priority)), ident[0], ident[1])  # type: ignore[attr-defined]

    def prepare(self, idents: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """Normalise (trim; email lowercase), drop blocked values and duplicates, order by priority."""
        seen: set[tuple[str, str]] = set()
        for kind, value in idents:
            v = self.usable(value)
            if v is None:
                continue
            if kind == "email":
                v = v.lower()
            seen.add((kind, v))
        if len(seen) < 2:  # most events carry one identifier: nothing to order
            return tuple(seen)
        return tuple(sorted(seen, key=self.sort_key))

    def script_rules(self) -> bytes:
        """The rule table the Lua script decodes once per call."""
        limits = dict(self.limits or {"user_id": 1, "*": 5})
        return orjson.dumps({
            "limits": limits,
            "default_limit": limits.get("*", 5),
            "max_merges": self.max_merges,
            "max_ids": self.max_identifiers,
            "alias": self.alias_merges,
            "windows": dict(self.windows or {}),
        })

    @classmethod
    def from_settings(cls, settings: Settings) -> IdentityRules:
        return cls(
            priority=tuple(settings.identity_priority),
            limits=dict(settings.identity_limits),
            windows=dict(settings.identity_limit_windows),
            blocked=tuple(settings.identity_blocked),
            max_merges=settings.max_merges,
            max_identifiers=settings.max_identifiers,
            alias_merges=settings.alias_merges,
        )
