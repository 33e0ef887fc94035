"""One frozen settings object read from the environment (12-factor), validated at start.

Every environment variable the product reads is declared in ``VARIABLES`` once; the README's configuration
table is generated from the same list (``persona-sync config``), so the docs cannot drift from the code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable and what it expects."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_DURATION = 100 * 365 * 86400.0  # no window, retention or look-back is longer than a century
MAX_DEDUPE_SHARDS = 65536  # a messageId's digest names its set with 16 bits (``service.spec.events.dedupe_digest``)


def parse_duration(name: str, raw: str) -> float:
    """Seconds from '24h', '30d', '5s', '500ms' or a bare number of seconds (at most ``MAX_DURATION``)."""
    m = _DURATION.match(raw)
    if not m:
        raise ConfigError(f"{name}={raw!r}: expected a duration such as 30s, 5m, 24h or 30d")
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if seconds > MAX_DURATION:
        raise ConfigError(f"{name}={raw[:40]!r}: at most 100 years (36500d)")
    return seconds


def _int(name: str, raw: str, lo: int = 0, hi: int | None = None) -> int:
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if v < lo:
        raise ConfigError(f"{name}={raw!r}: must be at least {lo}")
    if hi is not None and v > hi:
        raise ConfigError(f"{name}={raw!r}: must be at most {hi}")
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


def _http_url(name: str, raw: str) -> str:
    if not raw.lower().startswith(("https://", "http://")):
        raise ConfigError(f"{name}={raw!r}: expected an http:// or https:// URL")
    return raw


def _queue_url(raw: str, cluster: str) -> str:
    """RQ cannot run on a Redis Cluster (https://python-rq.org/docs/connections/): with one, the queue needs its own."""
    if not raw and _bool("REDIS_CLUSTER", cluster):
        raise ConfigError("REDIS_CLUSTER=true needs QUEUE_REDIS_URL: RQ cannot use a Redis Cluster, so set it to a "
                          "standalone Redis (or a redis+sentinel:// URL) for the job queue")
    return _redis_url("QUEUE_REDIS_URL", raw)


def _state_url(raw: str, cluster: str) -> str:
    if is_sentinel(raw) and _bool("REDIS_CLUSTER", cluster):
        raise ConfigError("REDIS_CLUSTER=true with a redis+sentinel:// REDIS_URL: a Redis Cluster fails over by "
                          "itself and has no Sentinel; give a seed node's redis:// URL, or set REDIS_CLUSTER=false")
    return _redis_url("REDIS_URL", raw)


def _redis_url(name: str, raw: str) -> str:
    """A Sentinel URL is checked here, at start, rather than at the first connection."""
    if is_sentinel(raw):
        try:
            parse_sentinel_url(raw)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    elif raw.split("://", 1)[0].endswith("+sentinel"):
        raise ConfigError(f"{name}: only redis+sentinel:// is supported for Sentinel (no TLS to the sentinels)")
    elif raw and ("://" not in raw or raw.split("://", 1)[0] not in ("redis", "rediss", "unix")):  # as redis-py
        # the value itself is not repeated: it may hold a password
        raise ConfigError(f"{name} needs a scheme: redis://host:6379/0, rediss://host:6380/0 (TLS), "
                          "unix:///path/to/redis.sock or redis+sentinel://host:26379/<service name>")
    return raw


SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
_SENTINEL_FORM = ("expected redis+sentinel://[[user]:password@]host:26379[,host:26379...]/<service name>[/<db>]"
                  "[?sentinel_password=...], e.g. redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster/0")


@dataclass(frozen=True)
class SentinelTarget:
    """Where the sentinels are, the service name they know the primary by, and the credentials: ``username`` and
    ``password`` are the data nodes', ``sentinel_password`` the sentinels' own (when they require one)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """A ``redis+sentinel://`` URL -> ``SentinelTarget``; ``ConfigError`` (never quoting a password) when malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ConfigError(f"Sentinel URL: {_SENTINEL_FORM}")
    auth, _, hosts = parts.netloc.rpartition("@")
    user, _, password = auth.partition(":")
    sentinels = []
    for host in (h.strip() for h in hosts.split(",")):
        if not host:
            continue
        if host.startswith("["):  # [IPv6]:port
            name, _, rest = host[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else str(SENTINEL_PORT) if not rest else "?"
        else:
            name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", str(SENTINEL_PORT))
            port = port or str(SENTINEL_PORT)
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"sentinel {host!r}: expected host:port, e.g. sentinel-1:26379")
        sentinels.append((name, int(port)))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"Sentinel URL: {_SENTINEL_FORM}")
    query = parse_qs(parts.query, keep_blank_values=True)
    if unknown := sorted(set(query) - {"sentinel_password"}):
        raise ConfigError(f"Sentinel URL: unknown option {unknown[0]!r} (only sentinel_password is understood)")
    return SentinelTarget(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0,
                          unquote(user) or None, unquote(password) or None,
                          query.get("sentinel_password", [""])[-1] or None)


def redact(url: str) -> str:
    """``url`` fit for a log line or an error message: passwords (userinfo, ``sentinel_password``) become ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        auth, _, hosts = netloc.rpartition("@")
        user, sep, _ = auth.partition(":")
        netloc = f"{user}{':***' if sep else ''}@{hosts}"
    query = re.sub(r"(^|&)(sentinel_password|password)=[^&]*", r"\1\2=***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return parts._replace(netloc=netloc, query=query).geturl()


# (name, default, meaning) — the single source for docs and parsing.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("REDIS_URL", "", "Redis for profile state and the job queue: `redis://`, `rediss://`, `unix://`, or "
     "`redis+sentinel://host:26379,host:26379/<service>[/<db>]`. Empty: `dev` starts an embedded redis-server."),
    ("REDIS_CLUSTER", "false", "`true`: REDIS_URL is a seed node of a Redis Cluster holding the profile state "
     "(QUEUE_REDIS_URL is then required)."),
    ("QUEUE_REDIS_URL", "", "Separate Redis for RQ jobs: standalone or `redis+sentinel://` (never a Cluster). "
     "Empty: same as REDIS_URL."),
    ("STATE_WAIT_REPLICAS", "0", "Replicas that must have a request's events before the receiver answers 200 "
     "(Redis `WAIT` after the apply script). 0: the primary's word is enough, and a failover loses what it had not "
     "yet sent to the replica. Fewer within STATE_WAIT_TIMEOUT: 503 (the events are applied on the primary; "
     "Segment's retry is then a duplicate). Imports and replays wait for them too (ten times as long per chunk) and "
     "stop, resumable, when they do not come. Run at least this many replicas plus one. Not with REDIS_CLUSTER."),
    ("STATE_WAIT_TIMEOUT", "1s", "How long the receiver waits for STATE_WAIT_REPLICAS replicas before it answers "
     "503 (10ms to 3s: the answer must beat Segment's 5 s deadline)."),
    ("DATA_DIR", "./var", "Where the embedded Redis keeps its data and AOF."),
    ("HOST", "127.0.0.1", "Address the web receiver binds to."),
    ("PORT", "8000", "Port of the web receiver."),
    ("WEB_CONCURRENCY", "2", "uvicorn worker processes for `persona-sync web` (about one per core)."),
    ("SPACE_ID", "default", "Space that /segment and write keys without a space map to."),
    ("SEGMENT_SHARED_SECRETS", "", "Comma-separated webhook shared secrets (several while rotating). Empty: open mode, "
     "unsigned bodies are trusted (development only)."),
    ("SEGMENT_WRITE_KEYS", "", "Comma-separated Tracking API write keys, each optionally `key=space`. Empty: open "
     "mode, any key is trusted (development only)."),
    ("CORS_ALLOW_ORIGINS", "*", "Comma-separated origins (`https://shop.example.com`, scheme and host, optional port) "
     "whose web pages may call the Tracking API (/v1/*, /b) and GET /v1/projects/<writeKey>/settings from a "
     "browser; `*` is any origin. Empty: no cross-origin browser calls. Cookies and other credentials are never "
     "allowed."),
    ("PROFILE_API_TOKEN", "", "Token for the Profile API (HTTP Basic username). Empty: Profile API disabled (401)."),
    ("PROFILE_API_RATE_LIMIT", "100", "Profile API requests per second per token, shared by every web process "
     "(Segment's limit is 100/s); over it: 429 with Retry-After. 0: no limit."),
    ("ADMIN_TOKEN", "", "Bearer token for /admin and /api routes. Empty: those routes are disabled (401)."),
    ("KPI_API_ID", "", "With KPI_API_SECRET: callers of POST /api/v1/segment_cluster_profiles may authenticate with "
     "the headers X-Customer-Api-Id and X-Secret instead of the ADMIN_TOKEN bearer. Set both or neither."),
    ("KPI_API_SECRET", "", "The X-Secret that goes with KPI_API_ID."),
    ("DEDUPE_WINDOW", "24h", "How long a messageId is remembered to drop retries."),
    ("DEDUPE_SHARDS", "65536", "Sets per dedupe bucket (at most 65536); size so each holds a few hundred ids."),
    ("EVENT_LOG_RETENTION", "30d", "How long the event log (a Redis Stream per space) keeps events. With an "
     "archive, 14d is enough (what the Profile API's /events serves): older events are in the archive files."),
    ("EVENT_ARCHIVE_DIR", "", "Directory of the event archive: hourly gzip NDJSON files laid out as Segment's S3 "
     "destination's, written before the log trims events (one directory for every worker: a shared mount when "
     "workers run on several hosts). Empty: no archive (`persona-sync dev` puts it under DATA_DIR/archive)."),
    ("DEAD_LETTER_MAX", "100000", "Most dead letters kept per space (oldest trimmed first)."),
    ("DEAD_LETTER_MAX_BYTES", "67108864", "Most bytes of dead letters (bodies and reasons) kept per space, oldest "
     "trimmed first; one body is kept up to 1 MiB. Only authenticated (or open-mode) bodies are ever dead letters."),
    ("REFUSAL_LOG_MAX", "10000", "Most entries in the log of requests refused before authentication (GET "
     "/admin/refusals): metadata only, never a body; one log for the deployment, oldest trimmed first."),
    ("MAX_BODY_BYTES", "16777216", "Largest webhook body accepted on /segment (Actions batches of 4000 events)."),
    ("IDENTITY_LIMITS", "user_id:1,*:5",
     "Most values per identifier type on one profile; `*` is every other type. `type:N:weekly` (daily, monthly, "
     "annually, or a duration such as 14d) counts only the values added in that sliding window."),
    ("IDENTITY_PRIORITY", "user_id,email", "Identifier types by priority; the rest follow alphabetically."),
    ("IDENTITY_BLOCKED", r"^[0-]*$,^-1$,^null$,^anonymous$,^undefined$",
     "Comma-separated regular expressions of values that are never identifiers."),
    ("MAX_MERGES", "100", "Most merges into one profile; past it events attach but nothing more merges."),
    ("MAX_IDENTIFIERS", "1000", "Most identifier values on one profile."),
    ("ALIAS_MERGES", "true", "Whether alias calls merge previousId's profile into userId's (Unify ignores alias)."),
    ("REFRESH_DEBOUNCE", "5s", "At most one profile refresh job is enqueued per this interval."),
    ("FULL_RECOMPUTE_CRON", "0 * * * *", "Cron schedule of the full recompute (run by `persona-sync cron`)."),
    ("RECOMPUTE_MODE", "local", "How a full recompute runs: `local` forks one process per core (up to 4) in the "
     "worker that takes it; `jobs` shares it out as RQ jobs of profile-id chunks, so every worker on every machine "
     "computes a part (for spaces one machine is too slow for)."),
    ("ANALYSIS_WINDOW_DAYS", "365", "Window for spend and order frequency in the features."),
    ("CLUSTER_RULES_FILE", "", "JSON rules that assign clusters. Empty: the packaged seed rules."),
    ("MIN_CLUSTER_SIZE", "3", "Smallest cluster that gets a Mavera persona, and channel pattern in the narrative."),
    ("INSIGHT_MIN_SHARE_PCT", "30", "KPI insight: share of revenue that marks a retention/upsell segment."),
    ("INSIGHT_REQUIRE_ABOVE_MEAN", "true", "KPI insight: also require average spend above the population mean."),
    ("MAVERA_API_KEY", "", "Mavera key (mvra_live_...). Empty: outbox mode, personas are kept locally."),
    ("MAVERA_BASE_URL", "https://app.mavera.io/api/v1", "Mavera API base URL."),
    ("MAVERA_RATE_LIMIT", "60", "Mavera requests per minute, shared by every worker (your plan's limit)."),
    ("MAVERA_TIMEOUT", "30s", "Read timeout of persona calls."),
    ("MAVE_CHAT_TIMEOUT", "180s", "Read timeout of Mave chat calls (they take 5-90 s; at least 120 s)."),
    ("MAVE_CHAT_CONCURRENCY", "10", "Most Mave chat calls in flight at once across workers, 1-10 (Mavera allows 10)."),
    ("LOG_LEVEL", "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR)."),
)


@dataclass(frozen=True)
class Settings:
    """Validated settings; build with ``Settings.from_env()``."""

    redis_url: str = ""
    queue_redis_url: str = ""
    redis_cluster: bool = False
    state_wait_replicas: int = 0
    state_wait_timeout: float = 1.0
    data_dir: str = "./var"
    host: str = "127.0.0.1"
    port: int = 8000
    web_concurrency: int = 2
    space_id: str = "default"
    shared_secrets: tuple[str, ...] = ()
    write_keys: Mapping[str, str] = field(default_factory=dict)
    cors_allow_origins: tuple[str, ...] = ("*",)
    profile_api_token: str = ""
    profile_api_rate_limit: int = 100
    admin_token: str = ""
    kpi_api_id: str = ""
    kpi_api_secret: str = ""
    dedupe_window: float = 86400.0
    dedupe_shards: int = 65536
    event_log_retention: float = 30 * 86400.0
    event_archive_dir: str = ""
    dead_letter_max: int = 100000
    dead_letter_max_bytes: int = 64 * 1024 * 1024
    refusal_log_max: int = 10000
    max_body_bytes: int = 16 * 1024 * 1024
    identity_limits: Mapping[str, int] = field(default_factory=lambda: {"user_id": 1, "*": 5})
    # type -> the sliding window (ms) its limit counts values in, for `type:N:weekly`; absent: ever
    identity_limit_windows: Mapping[str, int] = field(default_factory=dict)
    identity_priority: tuple[str, ...] = ("user_id", "email")
    identity_blocked: tuple[str, ...] = (r"^[0-]*$", r"^-1$", r"^null$", r"^anonymous$", r"^undefined$")
    max_merges: int = 100
    max_identifiers: int = 1000
    alias_merges: bool = True
    refresh_debounce: float = 5.0
    full_recompute_cron: str = "0 * * * *"
    analysis_window_days: int = 365
    cluster_rules_file: str = ""
    min_cluster_size: int = 3
    insight_min_share_pct: float = 30.0
    insight_require_above_mean: bool = True
    mavera_api_key: str = ""
    mavera_base_url: str = "https://app.mavera.io/api/v1"
    mavera_rate_limit: int = 60
    mavera_timeout: float = 30.0
    mave_chat_timeout: float = 180.0
    mave_chat_concurrency: int = 10
    log_level: str = "INFO"
    recompute_mode: str = "local"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        raw = {name: env.get(name, default) for name, default, _ in VARIABLES}
        limits, windows = _limits(raw["IDENTITY_LIMITS"])
        return cls(
            redis_url=_state_url(raw["REDIS_URL"].strip(), raw["REDIS_CLUSTER"]),
            queue_redis_url=_queue_url(raw["QUEUE_REDIS_URL"].strip(), raw["REDIS_CLUSTER"]),
            redis_cluster=_bool("REDIS_CLUSTER", raw["REDIS_CLUSTER"]),
            state_wait_replicas=_wait_replicas(raw["STATE_WAIT_REPLICAS"], raw["REDIS_CLUSTER"]),
            state_wait_timeout=_bounded_duration("STATE_WAIT_TIMEOUT", raw["STATE_WAIT_TIMEOUT"], 0.01, 3.0),
            data_dir=raw["DATA_DIR"],
            host=raw["HOST"],
            port=_int("PORT", raw["PORT"], 0, 65535),
            web_concurrency=_int("WEB_CONCURRENCY", raw["WEB_CONCURRENCY"], 1),
            space_id=_space("SPACE_ID", raw["SPACE_ID"]),
            shared_secrets=_list(raw["SEGMENT_SHARED_SECRETS"]),
            write_keys=_write_keys(raw["SEGMENT_WRITE_KEYS"], raw["SPACE_ID"]),
            cors_allow_origins=_origins(raw["CORS_ALLOW_ORIGINS"]),
            profile_api_token=raw["PROFILE_API_TOKEN"].strip(),  # blank is off; a Secret's file ends in a newline
            profile_api_rate_limit=_int("PROFILE_API_RATE_LIMIT", raw["PROFILE_API_RATE_LIMIT"], 0),
            admin_token=raw["ADMIN_TOKEN"].strip(),
            kpi_api_id=raw["KPI_API_ID"].strip(),
            kpi_api_secret=_pair_secret(raw["KPI_API_ID"].strip(), raw["KPI_API_SECRET"].strip()),
            dedupe_window=parse_duration("DEDUPE_WINDOW", raw["DEDUPE_WINDOW"]),
            dedupe_shards=_int("DEDUPE_SHARDS", raw["DEDUPE_SHARDS"], 1, MAX_DEDUPE_SHARDS),
            event_log_retention=parse_duration("EVENT_LOG_RETENTION", raw["EVENT_LOG_RETENTION"]),
            event_archive_dir=raw["EVENT_ARCHIVE_DIR"].strip(),
            dead_letter_max=_int("DEAD_LETTER_MAX", raw["DEAD_LETTER_MAX"], 1),
            dead_letter_max_bytes=_int("DEAD_LETTER_MAX_BYTES", raw["DEAD_LETTER_MAX_BYTES"], 1024),
            refusal_log_max=_int("REFUSAL_LOG_MAX", raw["REFUSAL_LOG_MAX"], 1),
            max_body_bytes=_int("MAX_BODY_BYTES", raw["MAX_BODY_BYTES"], 1024),
            identity_limits=limits,
            identity_limit_windows=windows,
            identity_priority=_types(raw["IDENTITY_PRIORITY"]),
            identity_blocked=_patterns(raw["IDENTITY_BLOCKED"]),
            max_merges=_int("MAX_MERGES", raw["MAX_MERGES"], 0),
            max_identifiers=_int("MAX_IDENTIFIERS", raw["MAX_IDENTIFIERS"], 1),
            alias_merges=_bool("ALIAS_MERGES", raw["ALIAS_MERGES"]),
            refresh_debounce=parse_duration("REFRESH_DEBOUNCE", raw["REFRESH_DEBOUNCE"]),
            full_recompute_cron=_cron(raw["FULL_RECOMPUTE_CRON"]),
            analysis_window_days=_int("ANALYSIS_WINDOW_DAYS", raw["ANALYSIS_WINDOW_DAYS"], 1),
            cluster_rules_file=raw["CLUSTER_RULES_FILE"].strip(),
            min_cluster_size=_int("MIN_CLUSTER_SIZE", raw["MIN_CLUSTER_SIZE"], 1),
            insight_min_share_pct=_float("INSIGHT_MIN_SHARE_PCT", raw["INSIGHT_MIN_SHARE_PCT"], 0, 100),
            insight_require_above_mean=_bool("INSIGHT_REQUIRE_ABOVE_MEAN", raw["INSIGHT_REQUIRE_ABOVE_MEAN"]),
            mavera_api_key=raw["MAVERA_API_KEY"].strip(),
            mavera_base_url=_http_url("MAVERA_BASE_URL", raw["MAVERA_BASE_URL"].strip().rstrip("/")),
            mavera_rate_limit=_int("MAVERA_RATE_LIMIT", raw["MAVERA_RATE_LIMIT"], 1),
            mavera_timeout=parse_duration("MAVERA_TIMEOUT", raw["MAVERA_TIMEOUT"]),
            mave_chat_timeout=_min_duration("MAVE_CHAT_TIMEOUT", raw["MAVE_CHAT_TIMEOUT"], 120),
            mave_chat_concurrency=_int("MAVE_CHAT_CONCURRENCY", raw["MAVE_CHAT_CONCURRENCY"], 1, 10),
            log_level=_level(raw["LOG_LEVEL"]),
            recompute_mode=_recompute_mode(raw["RECOMPUTE_MODE"]),
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (tests and the CLI use it)."""
        from dataclasses import replace

        return replace(self, **changes)


# events/s of a replay or import (the CLI's and POST /admin/replay's) unless told otherwise: measured to keep live
# single-event p95 within 2x of its unloaded value on the benchmark machine (BENCHMARKS.md, "Replay and import")
DEFAULT_REPLAY_RATE = 1000.0

_SPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


SPACE_ID_RULE = "1-64 letters, digits, '_', '-' or '.' (not dots alone)"  # what ``valid_space`` takes, to say so


def valid_space(space: str) -> bool:
    """Space ids become part of Redis hash tags and of the archive's paths, so keep them to a safe alphabet, and
    never '.' or '..' (a folder of the archive would then be its parent)."""
    return bool(_SPACE.match(space)) and space.strip(".") != ""


def _space(name: str, raw: str) -> str:
    if not valid_space(raw):
        raise ConfigError(f"{name}={raw!r}: use {SPACE_ID_RULE}")
    return raw


def _write_keys(raw: str, default_space: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in _list(raw):
        key, _, space = item.partition("=")
        keys[key.strip()] = _space("SEGMENT_WRITE_KEYS", space.strip() or default_space)
    return keys


_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def _origins(raw: str) -> tuple[str, ...]:
    """Origins as browsers send them in ``Origin``: scheme and host (and port), no path, no trailing slash."""
    origins = _list(raw)
    for origin in origins:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigError(f"CORS_ALLOW_ORIGINS item {origin!r}: expected * or an origin such as "
                              "https://shop.example.com or http://localhost:3000 (no path, no trailing slash)")
    return ("*",) if "*" in origins else tuple(o.lower() for o in origins)


def _pair_secret(api_id: str, secret: str) -> str:
    if bool(api_id) != bool(secret):
        raise ConfigError("KPI_API_ID and KPI_API_SECRET: set both (X-Customer-Api-Id / X-Secret) or neither")
    return secret


# Segment's limit periods (https://segment.com/docs/unify/identity-resolution/identity-resolution-settings/)
LIMIT_PERIODS = {"ever": 0, "daily": 86_400, "weekly": 7 * 86_400, "monthly": 30 * 86_400, "annually": 365 * 86_400,
                 "yearly": 365 * 86_400}


def _limits(raw: str) -> tuple[dict[str, int], dict[str, int]]:
    """``type:N`` or ``type:N:period`` items → (type -> N, type -> window in ms for those with a period)."""
    limits: dict[str, int] = {"user_id": 1, "*": 5}
    windows: dict[str, int] = {}
    for item in _list(raw):
        kind, sep, rest = item.partition(":")
        n, _, period = rest.partition(":")
        if not sep or not kind.strip():
            raise ConfigError(f"IDENTITY_LIMITS item {item!r}: expected type:number, e.g. email:5 or "
                              "anonymous_id:5:weekly")
        kind, period = kind.strip(), period.strip().lower()
        limits[kind] = _int("IDENTITY_LIMITS", n.strip(), 1)
        windows.pop(kind, None)
        if period and period != "ever":
            seconds: float | None = LIMIT_PERIODS.get(period)
            if seconds is None:
                try:
                    seconds = parse_duration("IDENTITY_LIMITS", period)
                except ConfigError:
                    raise ConfigError(f"IDENTITY_LIMITS item {item!r}: the period is one of "
                                      f"{', '.join(LIMIT_PERIODS)}, or a duration such as 14d") from None
            windows[kind] = int(seconds * 1000)
    return limits, windows


def _types(raw: str) -> tuple[str, ...]:
    """IDENTITY_PRIORITY: identifier types, which a profile keeps as 'type:value' (so no ':' in a type)."""
    types = _list(raw)
    for t in types:
        if ":" in t:
            raise ConfigError(f"IDENTITY_PRIORITY type {t!r}: no ':' in an identifier type")
    return types


def _patterns(raw: str) -> tuple[str, ...]:
    pats = _list(raw)
    for p in pats:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"IDENTITY_BLOCKED pattern {p!r}: {exc}") from None
    return pats


def _float(name: str, raw: str, low: float, high: float) -> float:
    """A number from ``low`` to ``high`` (never nan or inf, which ``float`` reads)."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if not low <= value <= high:  # false for nan too
        raise ConfigError(f"{name}={raw!r}: expected a number from {low:g} to {high:g}")
    return value


def _wait_replicas(raw: str, cluster: str) -> int:
    n = _int("STATE_WAIT_REPLICAS", raw, 0, 10)
    if n and _bool("REDIS_CLUSTER", cluster):
        raise ConfigError("STATE_WAIT_REPLICAS is not supported with REDIS_CLUSTER=true (each request's WAIT would "
                          "have to go to every primary its events reached): set it to 0")
    return n


def _bounded_duration(name: str, raw: str, lo: float, hi: float) -> float:
    v = parse_duration(name, raw)
    if not lo <= v <= hi:
        raise ConfigError(f"{name}={raw!r}: must be from {lo * 1000:.0f}ms to {hi:g}s")
    return v


def _min_duration(name: str, raw: str, lo: float) -> float:
    v = parse_duration(name, raw)
    if v < lo:
        raise ConfigError(f"{name}={raw!r}: must be at least {lo:.0f}s")
    return v


def _cron(raw: str) -> str:
    from croniter import croniter

    if not croniter.is_valid(raw.strip()):
        raise ConfigError(f"FULL_RECOMPUTE_CRON={raw!r}: expected a cron expression such as '0 * * * *'")
    return raw.strip()


def _level(raw: str) -> str:
    v = raw.strip().upper()
    if v not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL={raw!r}: expected DEBUG, INFO, WARNING or ERROR")
    return v


def _recompute_mode(raw: str) -> str:
    v = raw.strip().lower()
    if v not in ("local", "jobs"):
        raise ConfigError(f"RECOMPUTE_MODE={raw!r}: expected local or jobs")
    return v


EMBEDDED_SOCKET = "redis.sock"  # the embedded redis-server's unix socket, inside DATA_DIR


def dev_stack_env(env: Mapping[str, str], data_dir: str) -> dict[str, str]:
    """``env`` with what ``persona-sync dev`` gives its programs beyond it: on one box the archive lives beside the
    data (DATA_DIR/archive) and the log keeps 14 days. A command run against that stack from another terminal
    takes the same, so that it finds the archive the stack writes."""
    out = dict(env)
    if not out.get("EVENT_ARCHIVE_DIR"):
        out["EVENT_ARCHIVE_DIR"] = str(Path(data_dir).resolve() / "archive")
        out.setdefault("EVENT_LOG_RETENTION", "14d")
    return out


def _dev_socket(settings: Settings) -> Path:
    """Where a ``persona-sync dev`` under DATA_DIR keeps its embedded Redis's socket."""
    return Path(settings.data_dir).resolve() / EMBEDDED_SOCKET


def runs_dev_stack(settings: Settings) -> bool:
    """Whether commands reach a ``persona-sync dev`` under DATA_DIR (no REDIS_URL, and its socket is there)."""
    return not settings.redis_url and _dev_socket(settings).exists()


def state_url(settings: Settings) -> str:
    """REDIS_URL, else the socket of a running ``persona-sync dev`` under DATA_DIR."""
    if settings.redis_url:
        return settings.redis_url
    sock = _dev_socket(settings)
    if sock.exists():
        return f"unix://{sock}"
    raise ConfigError(f"REDIS_URL is not set and no `persona-sync dev` is running under DATA_DIR ({sock.parent}): "
                      "give this command the DATA_DIR you gave `make run` (e.g. DATA_DIR=./var2 persona-sync status), "
                      "start one with `make run`, or set REDIS_URL=redis://host:6379/0")


def queue_url(settings: Settings) -> str:
    """QUEUE_REDIS_URL, else the STATE Redis."""
    return settings.queue_redis_url or state_url(settings)
