"""Test helpers: apply raw Segment events straight through the store, and snapshot profiles for comparison."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from service.config import Settings
from service.spec.events import normalise
from service.spec.identity import IdentityRules
from service.spec.keys import TOMBSTONE
from service.spec.profile import Profile, decode_profile
from service.state.store import Outcome, SyncStore, state_keys

NOW = int(time.time() * 1000)  # "received" time; dedupe buckets expire relative to the real clock


def apply(client: redis.Redis, events: list[dict], settings: Settings | None = None, space: str = "default",
          batch: int = 500, now: int = NOW) -> list[Outcome]:
    settings = settings or Settings()
    rules = IdentityRules.from_settings(settings)
    store = SyncStore(client, settings)
    out: list[Outcome] = []
    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        out += store.apply(space, [(normalise(e, now, rules), orjson.dumps(e)) for e in chunk], now=now)
    return out


def profiles(client: redis.Redis, space: str = "default") -> list[Profile]:
    k = state_keys(client, space)
    out = []
    for key in client.scan_iter(match=k.profile("*"), count=1000):
        pid = key.decode().rsplit(":", 1)[1]
        out.append(decode_profile(pid, client.hgetall(key)))
    return out


def find(client: redis.Redis, kind: str, value: str, space: str = "default") -> Profile | None:
    k = state_keys(client, space)
    pid = client.get(k.ident(kind, value))
    if pid is None or pid.decode() == TOMBSTONE:
        return None
    return decode_profile(pid.decode(), client.hgetall(k.profile(pid.decode())))


def snapshot(client: redis.Redis, space: str = "default") -> dict:
    """Everything a user relies on, keyed by identifiers rather than by internal profile ids."""
    snap = {}
    for p in profiles(client, space):
        ids = tuple(sorted((i.type, i.value, i.first_seen, i.first_message_id) for i in p.identifiers))
        snap[ids] = {
            "traits": {n: (t.value, t.ts, t.kind) for n, t in p.traits.items()},
            "orders": [(o.key, o.ts, o.revenue, o.categories) for o in p.orders],
            "activity": p.activity,
            "groups": p.groups,
            "seen": {k: p.meta.get(k) for k in ("fs", "fm", "ls", "lm")},
            "counts": orjson.loads(p.meta.get("n", "{}")),
        }
    return snap


def mixed_stream(n: int, users: int, seed: int = 7) -> list[dict[str, Any]]:
    """A realistic mix of every call type for ``users`` people, within identity limits (so order cannot matter)."""
    rnd = random.Random(seed)
    base = NOW - 40 * 86_400_000
    people = []
    for u in range(users):
        people.append({
            "uid": f"user-{u}",
            "anons": [f"anon-{u}-{j}" for j in range(rnd.randint(1, 3))],
            "email": f"person{u}@example.com",
            "device": (f"dev-{u}", rnd.choice(["ios", "android"])) if rnd.random() < 0.5 else None,
        })
    events: list[dict[str, Any]] = []
    # every anonymous id is tied to its user once, so all of a person's events end on one profile
    for p in people:
        for a in p["anons"]:
            events.append({"type": "identify", "userId": p["uid"], "anonymousId": a, "traits": {"email": p["email"]}})
    kinds = ["identify", "page", "screen", "order", "email", "group", "audience", "computed", "alias", "track"]
    while len(events) < n:
        p = rnd.choice(people)
        kind = rnd.choice(kinds)
        anon = rnd.choice(p["anons"])
        known = rnd.random() < 0.7
        e: dict[str, Any] = {"anonymousId": anon}
        if known:
            e["userId"] = p["uid"]
        if kind == "identify":
            e.update(type="identify", traits={"plan": rnd.choice(["free", "pro", "enterprise"]),
                                              "ltv": rnd.randint(0, 2000), "churn_risk": round(rnd.random(), 2)})
        elif kind == "page":
            e.update(type="page", name="Home", context={"library": {"name": "analytics.js"}})
        elif kind in ("screen",) and p["device"]:
            dev, platform = p["device"]
            e.update(type="screen", name="Feed", context={"device": {"id": dev, "type": platform}})
        elif kind == "order":
            e.update(type="track", event="Order Completed", properties={
                "order_id": f"o-{len(events)}", "revenue": round(rnd.uniform(5, 300), 2),
                "products": [{"category": rnd.choice(["books", "toys", "garden", "tech"])}]})
        elif kind == "email":
            e.update(type="track", event="Email Opened", context={"traits": {"email": p["email"]}})
        elif kind == "group":
            e.update(type="group", userId=p["uid"], groupId=f"acct-{rnd.randint(0, 20)}",
                     traits={"industry": rnd.choice(["SaaS", "Retail"])})
        elif kind == "audience":
            entered = rnd.random() < 0.6
            e.update(type="track", event="Audience Entered" if entered else "Audience Exited",
                     properties={"audience_key": "vip", "vip": entered},
                     context={"personas": {"computation_class": "audience", "computation_key": "vip"}})
        elif kind == "computed":
            e.update(type="identify", traits={"web_sessions_30d": rnd.randint(0, 40)},
                     context={"personas": {"computation_class": "trait", "computation_key": "web_sessions_30d"}})
        elif kind == "alias":
            e = {"type": "alias", "userId": p["uid"], "previousId": anon}
        else:
            e.update(type="track", event="Product Viewed", properties={"sku": "x"})
        e.setdefault("type", "track")
        e.setdefault("event", "Fallback")
        e["messageId"] = f"m-{len(events)}"
        # timestamps in whole seconds: ties happen, and must be broken the same way in every order
        e["timestamp"] = _iso(base + rnd.randint(0, 39 * 86_400) * 1000)
        events.append(e)
    for i, e in enumerate(events):
        e.setdefault("messageId", f"m-{i}")
        e.setdefault("timestamp", _iso(base))
    return events


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def recomputed(client: redis.Redis, space: str = "default") -> dict:
    """What a recompute leaves: clusters, KPI cards, patterns, aggregates, contributions and the spend indexes."""
    from service.spec.keys import Keys
    from workers.compute.clusters import load_rules

    keys = Keys(space)
    out: dict = {key: {k: orjson.loads(v) for k, v in client.hgetall(key).items()}
                 for key in (keys.clusters, keys.patterns, keys.cluster_aggregates, keys.pattern_aggregates,
                             keys.contributions)}
    for name in load_rules().clusters:
        out[name] = client.zrange(keys.cluster_spend(name), 0, -1, withscores=True)
    return out


def big_if_ltv_above(path: Path, threshold: float) -> None:
    """Write a cluster rules file of two clusters: "big" for an ltv above ``threshold``, else "small"."""
    path.write_text(orjson.dumps({"rules": [{"cluster": "big", "all": [
        {"feature": "ltv", "op": ">", "value": threshold}]}], "default": "small"}).decode())
