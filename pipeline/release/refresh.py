"""refresh: copy the live release's user vectors, seen items and fallback list into Redis.

Keys are versioned by release and written in pipelined batches; the tenant's Redis pointer
flips last, with a compare-and-set, only once the release's `meta` (complete=1) is written.
A refresh killed halfway leaves the old release fully live; rerunning finishes the job.
The replaced release's keys expire after RECSYS_REDIS_GRACE_SECONDS.

An item-item release (EASE, item-kNN) scores a user from their seen list alone: its users'
`u:` keys hold an empty (zero-width) vector, which still marks the user as known.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.context import RunContext, StageIO
from pipeline.features import tables as feature_tables
from pipeline.release import format as release
from pipeline.storage import paths
from pipeline.storage.redis import FLIP_SCRIPT, key, redis_client

STAGE = "refresh"
IO = StageIO(writes=(paths.result("refresh"),))  # reads the tenant pointer and release, not the run
BATCH = 2_000


class RefreshFailed(RuntimeError):
    """Redis was unreachable or failed mid-way: transient, retry; the old release stays live."""


def write_release(r, prefix: str, rel: release.Release, batch: int | None = None) -> int:
    """Write every user's keys for `rel`; returns bytes written. Idempotent (plain SETs)."""
    batch = batch or BATCH
    t, rid = rel.tenant, rel.release_id
    written = 0
    ids = rel.user_ids.to_numpy()
    for start in range(0, len(ids), batch):
        pipe = r.pipeline(transaction=False)
        for row in range(start, min(start + batch, len(ids))):  # batching, not per-item math
            vec = rel.user_vectors[row].astype(np.float32).tobytes()
            seen = rel.seen(row).astype(np.int32).tobytes()
            pipe.set(key(prefix, t, rid, "u", ids[row]), vec)
            pipe.set(key(prefix, t, rid, "seen", ids[row]), seen)
            written += len(vec) + len(seen)
        pipe.execute()
    if rel.user_stats is not None:  # the online feature subset, float32 per user (names in meta)
        stats = rel.user_stats.set_index("user_id").reindex(ids)
        vectors = feature_tables.online_user_vectors(stats)
        for start in range(0, len(ids), batch):
            pipe = r.pipeline(transaction=False)
            for row in range(start, min(start + batch, len(ids))):
                pipe.set(key(prefix, t, rid, "uf", ids[row]), vectors[row].tobytes())
                written += vectors.shape[1] * 4
            pipe.execute()
    popular = rel.popular.astype(np.int32).tobytes()
    r.set(key(prefix, t, rid, "popular"), popular)
    meta = {"users": len(ids), "dim": rel.user_vectors.shape[1], "scoring": rel.scoring, "complete": 1}
    if rel.user_stats is not None:
        meta["user_features"] = ",".join(feature_tables.ONLINE_USER_FEATURES)
    r.hset(key(prefix, t, rid, "meta"), mapping=meta)
    return written + len(popular)


def flip(r, prefix: str, tenant: str, release_id: str, grace_seconds: int) -> tuple[bool, str | None]:
    """Point the tenant at release_id if its meta says complete; expire the replaced release."""
    if r.hget(key(prefix, tenant, release_id, "meta"), "complete") != b"1":
        raise RuntimeError(f"refusing to flip {tenant} to {release_id}: its Redis keys are incomplete")
    script = r.register_script(FLIP_SCRIPT)
    pointer = key(prefix, tenant, "current")
    while True:
        old = r.get(pointer)
        old_id = old.decode() if old else ""
        if old_id == release_id:
            return False, old_id or None
        ok, _ = script(keys=[pointer], args=[release_id, old_id])
        if int(ok) == 1:
            break  # else someone flipped in between: re-read and retry
    if old_id and grace_seconds >= 0:
        for k in r.scan_iter(match=key(prefix, tenant, old_id, "*"), count=1000):
            r.expire(k, max(grace_seconds, 1))
    return True, old_id or None


def refresh(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    url = ctx.settings.redis_url
    if not url:
        log.info("refresh: RECSYS_REDIS_URL unset; serving reads the release files (embedded store)")
        return ctx.write_result(STAGE, {"store": "embedded", "flipped": False})
    pointer = release.read_pointer(ctx.store, ctx.tenant)
    if pointer is None:
        raise ctx.error(STAGE, "nothing published yet: no release pointer to refresh from")
    rel = release.load_release(ctx.store, ctx.tenant, pointer[0]["release_id"])
    r = redis_client(url)
    prefix = ctx.settings.redis_prefix
    try:
        before = int(r.info("memory")["used_memory"])
        written = write_release(r, prefix, rel)
        after = int(r.info("memory")["used_memory"])
        flipped, previous = flip(r, prefix, ctx.tenant, rel.release_id, ctx.settings.redis_grace_seconds)
    except Exception as exc:  # redis errors: the old release keeps serving; Airflow retries
        raise RefreshFailed(
            f"[tenant {ctx.tenant}, run {ctx.run_id}, stage {STAGE}] Redis refresh of "
            f"{rel.release_id} failed ({type(exc).__name__}: {exc}); the previous release stays live"
        ) from exc
    result = {
        "store": "redis",
        "release_id": rel.release_id,
        "users": len(rel.user_ids),
        "flipped": flipped,
        "previous_release_id": previous,
        "payload_bytes": written,
        "redis_memory_delta_bytes": after - before,
    }
    log.info(
        "refresh: %d users of %s in Redis (%.1f MB payload, used_memory %+.1f MB); pointer %s",
        len(rel.user_ids),
        rel.release_id,
        written / 1e6,
        (after - before) / 1e6,
        f"flipped from {previous}" if flipped else "already current",
    )
    return ctx.write_result(STAGE, result)
