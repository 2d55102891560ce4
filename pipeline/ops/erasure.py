"""Deleting one user's data on request (GDPR-style): `python -m pipeline forget-user TENANT USER_ID`.

In this order, so a crash at any point leaves nothing that a later run would train on, and
running the command again finishes the job (every step is idempotent):

1. The user joins the tenant's erasure list (`pipeline/data/erased.py`): from then on every
   extract drops them from the source, the event log and the history it reads, so no later
   run, feature table or release contains them (the tenant's own source still has their
   events: that copy is the tenant's to delete).
2. Every history partition and event-log object holding the user is rewritten without them
   (one atomic put per object: readers see the old object or the new one, never half; an
   object left empty is deleted).
3. Their Redis keys (`u:`, `seen:`, `uf:`, `fu:`, `fseen:` under every release) are deleted,
   so serving with Redis treats them as unknown at once.
4. An audit record is written, create-only, one per request: who asked, when (the caller's
   clock), why, what was deleted (counts), and what still holds the user (the releases whose
   files carry their vector until retention removes them; retained run folders). It names
   the user only by the sha256 of their id, never their data.

Limits, said in the record too: published release files are immutable and checksummed, so
the live release (without Redis: what serving answers from) keeps the user's vector until
the next release replaces it; serving's in-process fold-in cache forgets them at the next
release or restart. A run already past its extract when the command ran may still publish
them once; run the command again after it (step 2 then finds what that run wrote).
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Settings
from pipeline.config.tenant import is_valid_tenant_id
from pipeline.data import erased
from pipeline.storage import ObjectStore, codecs, open_store, paths
from pipeline.storage.base import PreconditionFailed

REDIS_KINDS = ("u", "seen", "uf", "fu", "fseen")
_THREADS = 8


class ErasureError(Exception):
    """The request cannot be carried out; the message names the tenant and the user."""


def audit_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/erasure"


def _without(store: ObjectStore, key: str, user_id: str) -> tuple[int, str]:
    """Rewrite one Parquet object without the user's rows: (rows removed, "kept"|"rewritten"|"deleted").
    Written with the same codec as extract and the API, so a partition rewritten here has the
    bytes a later rerun of its day would give it."""
    df = codecs.read_parquet(store.get(key))
    if "user_id" not in df.columns:
        return 0, "kept"
    hit = (df["user_id"].astype("string") == user_id).fillna(False).to_numpy(dtype=bool)
    removed = int(hit.sum())
    if not removed:
        return 0, "kept"
    if removed == len(df):
        store.delete(key)
        return removed, "deleted"
    store.put(key, codecs.parquet_bytes(df[~hit].reset_index(drop=True)))
    return removed, "rewritten"


def _scrub(store: ObjectStore, keys: list[str], user_id: str) -> dict[str, int]:
    if not keys:
        return {"objects": 0, "rewritten": 0, "deleted": 0, "rows_removed": 0}
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(keys))) as pool:
        done = list(pool.map(lambda k: _without(store, k, user_id), keys))
    return {
        "objects": len(keys),
        "rewritten": sum(1 for _, what in done if what == "rewritten"),
        "deleted": sum(1 for _, what in done if what == "deleted"),
        "rows_removed": sum(n for n, _ in done),
    }


def _parquet_keys(store: ObjectStore, prefix: str) -> list[str]:
    return sorted(k for k in store.list(prefix + "/") if k.endswith(".parquet"))


def _redis_keys(client: Any, prefix: str, tenant: str, user_id: str) -> int:
    """Delete `{prefix}:{tenant}:{release}:{kind}:{user}` for every release; returns how many.
    SCAN with MATCH (the user id's glob characters escaped) visits the keyspace once; each key
    found is parsed back, so another user whose id ends in this one is never touched."""
    head = f"{prefix}:{tenant}:"
    tail = f":{user_id}"
    doomed = []
    for raw in client.scan_iter(match=_glob(head) + "*" + _glob(tail), count=1000):
        k = raw.decode() if isinstance(raw, bytes) else raw
        middle = k[len(head) : len(k) - len(tail)] if k.startswith(head) and k.endswith(tail) else ""
        release, _, kind = middle.partition(":")
        if release and ":" not in release and kind in REDIS_KINDS:
            doomed.append(k)
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i : i + 500])
    return len(doomed)


def _glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _holders(store: ObjectStore, tenant: str, user_id: str) -> tuple[list[str], list[str]]:
    """Releases whose user id map has the user, and retained runs whose extract output has them."""
    releases = sorted(
        k.split("/")[-2] for k in store.list(paths.releases_prefix(tenant) + "/") if k.endswith("/users.parquet")
    )
    runs = paths.runs_with(store.list(paths.runs_prefix(tenant)), tenant, paths.INTERACTIONS)

    def has(key: str) -> bool:
        col = pq.read_table(pa.BufferReader(store.get(key)), columns=["user_id"])["user_id"].cast(pa.string())
        return bool(pc.any(pc.equal(col, user_id)).as_py())

    keys = [paths.release_key(tenant, r, "users.parquet") for r in releases]
    keys += [paths.INTERACTIONS.key(tenant, r) for r in runs]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        found = list(pool.map(has, keys)) if keys else []
    rel = [r for r, f in zip(releases, found[: len(releases)], strict=True) if f]
    run = [r for r, f in zip(runs, found[len(releases) :], strict=True) if f]
    return rel, run


def forget_user(
    settings: Settings,
    tenant: str,
    user_id: str,
    *,
    requested_at: datetime,
    requested_by: str,
    reason: str = "",
    request_id: str | None = None,
) -> dict[str, Any]:
    """Carry out one erasure request (see the module docstring); returns the audit record."""
    who = f"tenant {tenant!r}, user {user_id!r}"
    if not is_valid_tenant_id(tenant):
        raise ErasureError(f"forget-user {who}: invalid tenant id")
    if not user_id or user_id != user_id.strip():
        raise ErasureError(f"forget-user {who}: the user id is empty or has surrounding spaces")
    store = open_store(settings.artifact_root)
    history_keys = _parquet_keys(store, paths.history_prefix(tenant))
    event_keys = _parquet_keys(store, paths.events_prefix(tenant))
    if not history_keys and not event_keys and not store.list(f"tenants/{tenant}/"):
        raise ErasureError(f"forget-user {who}: nothing is stored for this tenant under {store.uri('tenants/')}")
    try:
        newly = erased.add(store, tenant, user_id)
        hist = _scrub(store, history_keys, user_id)
        events = _scrub(store, event_keys, user_id)
    except Exception as exc:
        raise ErasureError(f"forget-user {who}: {exc} (nothing is lost: run the command again)") from exc
    redis_deleted: int | None = None
    if settings.redis_url:
        from pipeline.storage.redis import redis_client

        try:
            redis_deleted = _redis_keys(redis_client(settings.redis_url), settings.redis_prefix, tenant, user_id)
        except Exception as exc:
            raise ErasureError(f"forget-user {who}: Redis: {exc} (run the command again)") from exc
    releases, runs = _holders(store, tenant, user_id)
    rid = request_id or uuid.uuid4().hex
    record = {
        "request_id": rid,
        "tenant": tenant,
        "user_sha256": erased.user_hash(user_id),
        "requested_at": requested_at.isoformat(),
        "requested_by": requested_by,
        "reason": reason,
        "erasure_list": "added" if newly else "already listed",
        "history": hist,
        "event_log": events,
        "redis_keys_deleted": redis_deleted,
        "redis": "configured" if settings.redis_url else "not configured",
        "still_held_by": {
            "releases": releases,
            "runs": runs,
            "note": "published release files are immutable: they keep the user's vector until retention removes "
            "them; the live one serves it (without Redis) until the next release. Every later extract drops the user.",
        },
        "status": "complete",
    }
    key = f"{audit_prefix(tenant)}/{requested_at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-{rid}.json"
    try:
        store.put_if(key, json.dumps(record, indent=2, sort_keys=True).encode(), etag=None)
    except PreconditionFailed as exc:
        raise ErasureError(f"forget-user {who}: audit record {key} already exists (request id reused)") from exc
    return {**record, "audit_key": key}
