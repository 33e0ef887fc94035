"""One frozen settings object read from the environment (12-factor), validated at start.

Every environment variable the product reads is declared in ``VARIABLES`` once; the README's configuration
table is generated from the same list (``persona-sync config``), so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and what it expects."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(name: str, raw: str) -> float:
    """Seconds from '24h', '30d', '5s', '500ms' or a bare number of seconds."""
    m = _DURATION.match(raw)
    if not m:
        raise ConfigError(f"{name}={raw!r}: expected a duration such as 30s, 5m, 24h or 30d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _int(name: str, raw: str, lo: int = 0) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if v < lo:
        raise ConfigError(f"{name}={raw!r}: must be at least {lo}")
    return v


def _list(raw: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in raw.split(",") if x.strip())


def _bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


# (name, default, meaning) — the single source for docs and parsing.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("REDIS_URL", "", "Redis for profile state and the job queue. Empty: `dev` starts an embedded redis-server."),
    ("QUEUE_REDIS_URL", "", "Separate Redis for RQ jobs (must not be a Cluster). Empty: same as REDIS_URL."),
    ("DATA_DIR", "./var", "Where the embedded Redis keeps its data and AOF."),
    ("HOST", "127.0.0.1", "Address the web receiver binds to."),
    ("PORT", "8000", "Port of the web receiver."),
    ("WEB_CONCURRENCY", "1", "uvicorn worker processes for `persona-sync web`."),
    ("SPACE_ID", "default", "Space that /segment and write keys without a space map to."),
    ("SEGMENT_SHARED_SECRETS", "", "Comma-separated webhook shared secrets (several while rotating). Empty: unsigned."),
    ("SEGMENT_WRITE_KEYS", "", "Comma-separated Tracking API write keys, each optionally `key=space`. Empty: any key."),
    ("PROFILE_API_TOKEN", "", "Token for the Profile API (HTTP Basic username). Empty: Profile API disabled (401)."),
    ("ADMIN_TOKEN", "", "Bearer token for /admin and /api routes. Empty: those routes are disabled (401)."),
    ("DEDUPE_WINDOW", "24h", "How long a messageId is remembered to drop retries."),
    ("DEDUPE_SHARDS", "65536", "Hash shards per dedupe bucket; size so each shard holds a few hundred ids."),
    ("EVENT_LOG_RETENTION", "30d", "How long the event log (a Redis Stream per space) keeps events."),
    ("DEAD_LETTER_MAX", "100000", "Most dead letters kept per space (oldest trimmed first)."),
    ("MAX_BODY_BYTES", "16777216", "Largest webhook body accepted on /segment (Actions batches of 4000 events)."),
    ("IDENTITY_LIMITS", "user_id:1,*:5", "Most values per identifier type on one profile; `*` is every other type."),
    ("IDENTITY_PRIORITY", "user_id,email", "Identifier types by priority; the rest follow alphabetically."),
    ("IDENTITY_BLOCKED", r"^[0-]*$,^-1$,^null$,^anonymous$,^undefined$",
     "Comma-separated regular expressions of values that are never identifiers."),
    ("MAX_MERGES", "100", "Most merges into one profile; past it events attach but nothing more merges."),
    ("MAX_IDENTIFIERS", "1000", "Most identifier values on one profile."),
    ("ALIAS_MERGES", "true", "Whether alias calls merge previousId's profile into userId's (Unify ignores alias)."),
    ("REFRESH_DEBOUNCE", "5s", "At most one profile refresh job is enqueued per this interval."),
    ("LOG_LEVEL", "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR)."),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings; build with ``Settings.from_env()``."""

    redis_url: str = ""
    queue_redis_url: str = ""
    data_dir: str = "./var"
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 1
    space_id: str = "default"
    shared_secrets: tuple[str, ...] = ()
    write_keys: Mapping[str, str] = field(default_factory=dict)
    profile_api_token: str = ""
    admin_token: str = ""
    dedupe_window: float = 86400.0
    dedupe_shards: int = 65536
    event_log_retention: float = 30 * 86400.0
    dead_letter_max: int = 100000
    max_body_bytes: int = 16 * 1024 * 1024
    identity_limits: Mapping[str, int] = field(default_factory=lambda: {"user_id": 1, "*": 5})
    identity_priority: tuple[str, ...] = ("user_id", "email")
    identity_blocked: tuple[str, ...] = (r"^[0-]*$", r"^-1$", r"^null$", r"^anonymous$", r"^undefined$")
    max_merges: int = 100
    max_identifiers: int = 1000
    alias_merges: bool = True
    refresh_debounce: float = 5.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        raw = {name: env.get(name, default) for name, default, _ in VARIABLES}
        return cls(
            redis_url=raw["REDIS_URL"].strip(),
            queue_redis_url=raw["QUEUE_REDIS_URL"].strip(),
            data_dir=raw["DATA_DIR"],
            host=raw["HOST"],
            port=_int("PORT", raw["PORT"], 0),
            web_concurrency=_int("WEB_CONCURRENCY", raw["WEB_CONCURRENCY"], 1),
            space_id=_space("SPACE_ID", raw["SPACE_ID"]),
            shared_secrets=_list(raw["SEGMENT_SHARED_SECRETS"]),
            write_keys=_write_keys(raw["SEGMENT_WRITE_KEYS"], raw["SPACE_ID"]),
            profile_api_token=raw["PROFILE_API_TOKEN"],
            admin_token=raw["ADMIN_TOKEN"],
            dedupe_window=parse_duration("DEDUPE_WINDOW", raw["DEDUPE_WINDOW"]),
            dedupe_shards=_int("DEDUPE_SHARDS", raw["DEDUPE_SHARDS"], 1),
            event_log_retention=parse_duration("EVENT_LOG_RETENTION", raw["EVENT_LOG_RETENTION"]),
            dead_letter_max=_int("DEAD_LETTER_MAX", raw["DEAD_LETTER_MAX"], 1),
            max_body_bytes=_int("MAX_BODY_BYTES", raw["MAX_BODY_BYTES"], 1024),
            identity_limits=_limits(raw["IDENTITY_LIMITS"]),
            identity_priority=_list(raw["IDENTITY_PRIORITY"]),
            identity_blocked=_patterns(raw["IDENTITY_BLOCKED"]),
            max_merges=_int("MAX_MERGES", raw["MAX_MERGES"], 0),
            max_identifiers=_int("MAX_IDENTIFIERS", raw["MAX_IDENTIFIERS"], 1),
            alias_merges=_bool("ALIAS_MERGES", raw["ALIAS_MERGES"]),
            refresh_debounce=parse_duration("REFRESH_DEBOUNCE", raw["REFRESH_DEBOUNCE"]),
            log_level=_level(raw["LOG_LEVEL"]),
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI use it)."""
        from dataclasses import replace

        return replace(self, **changes)


_SPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def valid_space(space: str) -> bool:
    """Space ids become part of Redis hash tags, so keep them to a safe alphabet."""
    return bool(_SPACE.match(space))


def _space(name: str, raw: str) -> str:
    if not valid_space(raw):
        raise ConfigError(f"{name}={raw!r}: use 1-64 letters, digits, '_', '-' or '.'")
    return raw


def _write_keys(raw: str, default_space: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in _list(raw):
        key, _, space = item.partition("=")
        keys[key.strip()] = _space("SEGMENT_WRITE_KEYS", space.strip() or default_space)
    return keys


def _limits(raw: str) -> dict[str, int]:
    limits = {"user_id": 1, "*": 5}
    for item in _list(raw):
        kind, sep, n = item.partition(":")
        if not sep:
            raise ConfigError(f"IDENTITY_LIMITS item {item!r}: expected type:number, e.g. email:5")
        limits[kind.strip()] = _int("IDENTITY_LIMITS", n.strip(), 1)
    return limits


def _patterns(raw: str) -> tuple[str, ...]:
    pats = _list(raw)
    for p in pats:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"IDENTITY_BLOCKED pattern {p!r}: {exc}") from None
    return pats


def _level(raw: str) -> str:
    v = raw.strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL={raw!r}: expected DEBUG, INFO, WARNING or ERROR")
    return v
