"""Keep one Mavera persona per cluster, and the Mave channel narrative, in step with the recomputed summaries.

Never two personas for one cluster: Mavera has no idempotency keys and no external-id field, so the cluster →
persona id mapping is ours (``Keys.personas``). A cluster without a stored id first looks for a persona with its
deterministic name (a create whose answer was lost, or a crash before the id was stored) and adopts it; only then,
holding the cluster's lock, does it create. Unchanged payloads (same hash as last sent) make no call, and neither
does adopting a persona whose fields already hold the payload.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
import redis

from service.config import Settings
from service.logs import event as log_event
from service.spec.clock import now_ms
from service.spec.keys import Keys
from service.state.locks import held_lock
from service.state.ops import paused
from workers.compute.channels import build_prompt, material_changes
from workers.mavera.client import CreditsExhausted, MaveraClient, MaveraError, MaybeAnswered, MaybeCreated
from workers.mavera.ratelimit import RateLimited

log = logging.getLogger("sync")
# Persona detail fields per default cluster (documented Mavera fields only). Other clusters get generic text.
PROFILES = {
    "high_value": {"goals": ["Get more value from a product they already trust"], "pains": ["Generic, mass messaging"],
                   "values": ["Quality", "Recognition", "Reliability"], "pipeline_type": "north_star"},
    "growth": {"goals": ["Find more products that fit their needs"], "pains": ["Too many choices"],
               "values": ["Value for money", "Discovery"], "pipeline_type": "intermediate"},
    "at_risk": {"goals": ["Solve their problem without friction"], "pains": ["Unanswered issues", "Price"],
                "values": ["Responsiveness", "Fairness"], "pipeline_type": "intermediate"},
    "new": {"goals": ["Understand whether the product is for them"], "pains": ["Unclear first steps"],
            "values": ["Simplicity", "Trust"], "pipeline_type": "intermediate"},
}


class SyncFailed(RuntimeError):
    """Some clusters were refused by Mavera (400-404); the message lists them so the failed RQ job shows why.

    ``retry`` lists the clusters that only need time (a create to settle, a rate limit to pass): the job queues
    another sync for them."""

    def __init__(self, message: str, retry: list[str] | None = None) -> None:
        super().__init__(message)
        self.retry = retry or []


REFUSED = (400, 409, 413, 422)  # the payload itself was refused (401/403/404 are about the key, URL or id)


def refused(exc: MaveraError) -> bool:
    """The same payload would be refused again, so later syncs do not re-send it until it changes."""
    return exc.status in REFUSED


def transient(exc: BaseException) -> bool:
    """Only time is needed: a rate limit, Mavera's (or its gateway's) 5xx outlasting the client's retries, or a
    charged call whose answer was lost."""
    return isinstance(exc, (RateLimited, MaybeAnswered)) or (isinstance(exc, MaveraError) and exc.status >= 500)


class LockLost(RuntimeError):
    """The cluster's create lock lapsed (Redis unreachable while renewing): do not send a create without it."""


NAME_MAX = 100  # Mavera's longest persona name


def persona_name(space: str, doc: dict) -> str:
    """Deterministic and distinct per (space, cluster): it is how a create whose answer was lost is found again,
    and any persona listed under it is taken as this cluster's. So a name too long for Mavera shortens the label,
    never the space id, and carries a digest of both space and cluster: two long labels, or two spaces whose ids
    share a prefix, never name the same persona."""
    label = doc.get("label") or doc["cluster"]
    name = f"{label} · {space}"
    if len(name) <= NAME_MAX:
        return name
    tag = hashlib.sha256(f"{space}\0{doc['cluster']}".encode()).hexdigest()[:10]
    room = max(NAME_MAX - len(f"… {tag} · {space}"), 1)
    return f"{label[:room].rstrip()}… {tag} · {space}"[:NAME_MAX]


def cadence(avg_frequency: float) -> str:
    """From orders per customer in the analysis window (365 days by default)."""
    if avg_frequency >= 12:
        return "monthly or more often"
    if avg_frequency >= 4:
        return "quarterly"
    if avg_frequency >= 1:
        return "once or twice a year"
    return "no purchase yet"


def persona_payload(space: str, doc: dict) -> dict[str, Any]:
    """Mavera persona from the cluster summary and its KPI card (documented fields only)."""
    summary, kpi = doc.get("summary") or {}, doc.get("kpi") or {}
    tops = kpi.get("top_categories") or ""  # the KPI card's text ("bags, hats"); a list in cards of older versions
    if isinstance(tops, list):
        tops = ", ".join(tops)
    industries, plans = summary.get("industries") or [], summary.get("plans") or []
    profile = PROFILES.get(doc["cluster"], {"goals": [], "pains": [], "values": [], "pipeline_type": "intermediate"})
    description = (  # figures rounded for reading, so a refresh that moves only cents leaves the persona alone
        f"{doc.get('n', 0):,} customers. Average LTV ${summary.get('avg_ltv', 0):,.0f}, "
        f"{summary.get('avg_purchases', 0):.1f} purchases on average, churn risk {summary.get('avg_churn', 0):.0%}. "
        f"Spend in the analysis window: average ${kpi.get('avg_spend', 0):,.0f}, median "
        f"${kpi.get('median_spend', 0):,.0f}, {kpi.get('avg_frequency', 0):.1f} orders; "
        f"{kpi.get('share_of_revenue_pct', 0):.0f}% of revenue. "
        f"Top categories: {tops or 'none yet'}. "
        f"Plans: {', '.join(plans) or 'unknown'}. "
        f"Industries: {', '.join(industries) or 'unknown'}. {kpi.get('insight', '')}"
    ).strip()
    payload: dict[str, Any] = {
        "name": persona_name(space, doc),
        "description": description,
        "pipeline_type": profile["pipeline_type"],
        "type": "B2B" if industries else "B2C",
        "goals": profile["goals"], "pains": profile["pains"], "values": profile["values"],
        "purchase_cadence": cadence(float(kpi.get("avg_frequency") or 0)),
    }
    if industries:
        payload["industry"] = industries[0]
    return payload


def withheld_payload(min_size: int) -> dict[str, Any]:
    """What a persona says while its cluster has fewer people than MIN_CLUSTER_SIZE (or none): its figures would
    be a few people's, or still hold those of people since erased."""
    return {"description": f"Fewer than {min_size} customers in this cluster at the moment: its figures are "
                           f"withheld until it has {min_size} or more again."}


def payload_hash(payload: dict) -> str:
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _load(client: redis.Redis, key: str) -> dict[str, dict]:
    return {k.decode(): orjson.loads(v) for k, v in client.hgetall(key).items()}


def sync_space(client: redis.Redis, settings: Settings, space: str, mavera: MaveraClient | None,
               job_id: str | None = None) -> dict:
    """Create, PATCH or leave alone each cluster's persona; without a client keep them in the outbox.

    A payload Mavera refused (``REFUSED``) is not sent again until it changes, except by the job that was refused
    (``job_id``): requeueing that failed job (``rq requeue``) is how an operator retries after fixing the cause."""
    keys = Keys(space)
    docs, records = _load(client, keys.clusters), _load(client, keys.personas)
    report: dict[str, list] = {"created": [], "adopted": [], "updated": [], "unchanged": [], "outbox": [],
                               "paused": [], "failed": [], "retry": [], "refused": [], "small": [], "withheld": []}
    listing: list[dict] | None = None
    # clusters, and those gone since their persona was made: a persona of a cluster below MIN_CLUSTER_SIZE or gone
    # is PATCHed to withhold its figures (those of a few people, or of people erased since)
    for cluster in sorted(set(docs) | {c for c, rec in records.items() if rec.get("mavera_id")}):
        doc, rec = docs.get(cluster), records.get(cluster, {})
        n = doc.get("n", 0) if doc is not None else 0
        small = doc is None or n < settings.min_cluster_size
        if small:
            report["small"].append(cluster)
            if not rec.get("mavera_id"):
                if rec:
                    _save(client, keys, cluster, rec, note=f"below MIN_CLUSTER_SIZE ({n} profiles)")
                continue
            payload = withheld_payload(settings.min_cluster_size)
            rec["note"] = f"below MIN_CLUSTER_SIZE ({n} profiles): figures withheld"
        else:
            assert doc is not None
            rec.pop("note", None)
            payload = persona_payload(space, doc)
        digest = payload_hash(payload)
        if rec.get("hash") == digest and rec.get("state") == "synced":
            report["unchanged"].append(cluster)
            continue
        if rec.get("state") == "failed" and rec.get("refused_hash") == digest and \
                (job_id is None or rec.get("refused_by") != job_id):
            report["refused"].append(cluster)  # the failed job already carries Mavera's message
            continue
        rec.update(name=payload.get("name", rec.get("name")), payload=payload, pending_hash=digest)
        if mavera is None:
            _save(client, keys, cluster, rec, state="outbox")
            report["outbox"].append(cluster)
            continue
        if paused(client):
            _save(client, keys, cluster, rec, state="paused", error="Mavera sync paused (402)")
            report["paused"].append(cluster)
            continue
        try:
            if rec.get("mavera_id"):
                try:
                    mavera.update_persona(rec["mavera_id"], payload)
                    report["withheld" if small else "updated"].append(cluster)
                except MaveraError as exc:
                    if exc.status != 404:
                        raise
                    # Gone at Mavera (deleted there): look it up by name, adopt or create it again (not to
                    # withhold figures: none are left to withhold)
                    log_event(log, "persona not found", logging.WARNING, space=space, cluster=cluster)
                    rec.pop("mavera_id")
                    if small:
                        _save(client, keys, cluster, rec, state="pending", error=None)
                        continue
                    _save(client, keys, cluster, rec, state="pending", error=f"persona not found at Mavera: {exc}")
            if not rec.get("mavera_id"):
                listing, stale = _create_once(client, keys, cluster, rec, payload, mavera, listing, report,
                                              grace_ms=int(2 * settings.mavera_timeout * 1000),
                                              lock_s=3 * settings.mavera_timeout)
                if not rec.get("mavera_id"):
                    continue
                if stale:
                    mavera.update_persona(rec["mavera_id"], payload)
            _save(client, keys, cluster, rec, state="synced", hash=digest, error=None, refused_hash=None,
                  refused_by=None)
            client.srem(keys.changed_clusters, cluster)
        except CreditsExhausted as exc:
            _save(client, keys, cluster, rec, state="paused", error=exc.message)
            report["paused"].append(cluster)
        except MaveraError as exc:
            _save(client, keys, cluster, rec, state="failed", error=str(exc),
                  refused_hash=digest if refused(exc) else None, refused_by=job_id)
            report["failed"].append(f"{cluster}: {exc}")
            if transient(exc):
                report["retry"].append(cluster)
        except MaybeCreated as exc:
            _save(client, keys, cluster, rec, state="pending", error=f"create may have succeeded: {exc}",
                  uncertain_create_ms=now_ms())
            report["failed"].append(f"{cluster}: {exc}")
            report["retry"].append(cluster)
        except (RateLimited, LockLost) as exc:
            _save(client, keys, cluster, rec, state="pending", error=str(exc))
            report["failed"].append(f"{cluster}: {exc}")
            report["retry"].append(cluster)
    log_event(log, "sync", space=space, **{k: len(v) for k, v in report.items()})
    if report["failed"]:
        raise SyncFailed("; ".join(report["failed"]), retry=report["retry"])
    return report


def holds(persona: dict, payload: dict) -> bool:
    """Mavera's persona already carries every field we would PATCH, so a PATCH would change nothing. A field the
    listing leaves out counts as different: a needless PATCH is cheap, a stale persona is not."""
    return all(k in persona and persona[k] == v for k, v in payload.items())


def _adopt(client: redis.Redis, keys: Keys, cluster: str, rec: dict, payload: dict, listing: list[dict],
           report: dict) -> bool | None:
    """Take the listed persona with our deterministic name as this cluster's. None when there is none; else
    whether it still needs a PATCH (not when a create whose answer was lost already gave it this payload)."""
    found = [p for p in listing if p.get("name") == payload["name"]]
    if not found:
        return None
    rec["mavera_id"] = found[0]["id"]
    rec.pop("uncertain_create_ms", None)
    report["adopted"].append(cluster)
    _save(client, keys, cluster, rec, state="pending")  # the id is ours before anything else can fail
    return not holds(found[0], payload)


def _create_once(client: redis.Redis, keys: Keys, cluster: str, rec: dict, payload: dict, mavera: MaveraClient,
                 listing: list[dict] | None, report: dict, grace_ms: int,
                 lock_s: float) -> tuple[list[dict] | None, bool]:
    """Adopt a persona with our deterministic name if Mavera has one; else create it, under the cluster's lock.
    Returns the listing (reused by the next cluster) and whether the persona still needs a PATCH.

    A create whose answer was lost is looked up at once, in the same job: Mavera has usually done it, and adopting
    it then saves a whole retry. Only if it is not listed yet do we wait ``grace_ms`` (twice the request timeout)
    and look again before creating: a create that timed out on our side may still be running at Mavera."""
    with held_lock(client, keys.persona_lock(cluster), lock_s) as lock:
        if lock is None:
            report["failed"].append(f"{cluster}: another worker is creating this persona")
            report["retry"].append(cluster)
            return listing, False
        fresh = _load(client, keys.personas).get(cluster, {})  # as it is now, not as this job first read it
        if fresh.get("mavera_id"):  # another worker finished first; it already sent this payload if it synced it
            rec["mavera_id"] = fresh["mavera_id"]
            return listing, not (fresh.get("state") == "synced" and fresh.get("hash") == rec.get("pending_hash"))
        uncertain = fresh.get("uncertain_create_ms") or rec.get("uncertain_create_ms")
        if uncertain or listing is None:  # after a lost create, list afresh: a listing from before may miss it
            listing = mavera.list_personas()
        stale = _adopt(client, keys, cluster, rec, payload, listing, report)
        if stale is not None:
            return listing, stale
        if uncertain and now_ms() - uncertain < grace_ms:
            rec["uncertain_create_ms"] = uncertain
            report["failed"].append(f"{cluster}: waiting for a lost create to settle before creating again")
            report["retry"].append(cluster)
            return listing, False
        rec.pop("uncertain_create_ms", None)
        # Uncertain from the moment the POST goes out until the id is stored: a worker killed mid-create (job
        # timeout, OOM) leaves this mark, and the next sync waits out the grace period before creating again.
        _save(client, keys, cluster, rec, state="creating")

        def before_send() -> None:
            if not lock.owned():
                raise LockLost(f"{cluster}: lost the create lock; the next sync reconciles")
            _save(client, keys, cluster, rec, uncertain_create_ms=now_ms())

        try:
            created = mavera.create_persona(payload, on_send=before_send)
        except (MaveraError, RateLimited):  # refused, or never sent: nothing was created
            rec.pop("uncertain_create_ms", None)
            raise
        except MaybeCreated as lost:  # look now; if it is not listed yet, the mark stays and the grace applies
            try:
                listing = mavera.list_personas()
            except (MaveraError, RateLimited):
                raise lost from None
            stale = _adopt(client, keys, cluster, rec, payload, listing, report)
            if stale is None:
                raise
            return listing, stale
        rec["mavera_id"] = created["id"]
        rec.pop("uncertain_create_ms", None)
        _save(client, keys, cluster, rec, state="pending")  # the id is ours before anything else can fail
        listing.append(created)
        report["created"].append(cluster)
        return listing, False


def _save(client: redis.Redis, keys: Keys, cluster: str, rec: dict, **changes: Any) -> None:
    rec.update(changes)
    rec["last_sync_ms"] = now_ms() if changes.get("state") == "synced" else rec.get("last_sync_ms")
    client.hset(keys.personas, cluster, orjson.dumps(rec))


def narrate_space(client: redis.Redis, settings: Settings, space: str, mavera: MaveraClient | None,
                  force: bool = False) -> dict:
    """Ask Mave for the cross-channel narrative when the channel patterns changed materially."""
    keys = Keys(space)
    # a pattern of fewer people than a persona needs is left out: its averages would be one person's figures
    patterns = {p: s for p, s in _load(client, keys.patterns).items() if s.get("n", 0) >= settings.min_cluster_size}
    if not patterns:
        return {"state": "no_patterns"}
    stored = {k.decode(): v.decode() for k, v in client.hgetall(keys.narrative).items()}
    old = orjson.loads(stored["patterns"]) if stored.get("patterns") else {}
    reasons = material_changes(old, patterns)
    if not force and stored.get("state") == "synced" and not reasons:
        return {"state": "unchanged"}
    prompt = build_prompt(patterns)
    base = {"patterns": orjson.dumps(patterns), "prompt": prompt, "reasons": "; ".join(reasons) or "first run"}
    if mavera is None or paused(client):
        client.hset(keys.narrative, mapping={**base, "state": "outbox" if mavera is None else "paused"})
        return {"state": "outbox" if mavera is None else "paused"}
    thread = stored.get("thread_id") or None
    try:
        try:
            answer = mavera.chat(prompt, thread_id=thread)
        except MaveraError as exc:
            if exc.status != 404 or thread is None:
                raise
            # the thread is gone at Mavera (deleted in its app, or expired): asking in it would fail for ever
            log_event(log, "mave thread not found", logging.WARNING, space=space)
            answer = mavera.chat(prompt, thread_id=None)
    except (MaveraError, RateLimited, MaybeAnswered) as exc:
        client.hset(keys.narrative, mapping={"state": "failed", "error": str(exc)})
        raise
    client.hset(keys.narrative, mapping={**base, "state": "synced", "content": answer.get("content") or "",
                                         "thread_id": answer.get("thread_id") or "", "at_ms": now_ms(),
                                         "error": ""})
    return {"state": "synced", "thread_id": answer.get("thread_id")}
