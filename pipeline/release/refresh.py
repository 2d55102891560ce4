"""refresh: copy the live release's user vectors, seen items and fallback list into Redis.

Keys are versioned by release and written in pipelined batches; the tenant's Redis pointer
flips last, atomically (FLIP_SCRIPT), only once the release's `meta` (complete=1) is written,
and only to a higher order than Redis holds: the order is the store pointer's generation
(pipeline/release/pointer.py), so a slow or retried refresh that read an older store pointer
never moves Redis back (it is refused before writing, or at the flip), and a rollback, a
higher generation, is followed. A refresh killed halfway leaves the old release fully live;
rerunning finishes the job.

TTLs: writes keep a key's TTL (SET KEEPTTL), so a refresh that loses never makes a replaced
release's keys immortal; the release that goes live has its keys PERSISTed after the flip (a
rollback to a release whose keys were expiring keeps them); a refused release's keys expire
after the grace period, and so do the replaced release's (never while a release is live).

An item-item release (EASE, item-kNN) scores a user from their seen list alone: its users'
`u:` keys hold an empty (zero-width) vector, which still marks the user as known.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.context import RunContext, StageIO
from pipeline.data import erased
from pipeline.features import tables as feature_tables
from pipeline.release import format as release
from pipeline.release import redis_pointer
from pipeline.release.pointer import generation_of
from pipeline.storage import ObjectStore, paths
from pipeline.storage.redis import key, redis_client

STAGE = "refresh"
IO = StageIO(writes=(paths.result("refresh"),))  # reads the tenant pointer and release, not the run
BATCH = 2_000


class RefreshFailed(RuntimeError):
    """Redis was unreachable or failed mid-way: transient, retry; the old release stays live."""


def write_release(
    r, prefix: str, rel: release.Release, batch: int | None = None, skip: np.ndarray | None = None
) -> int:
    """Write every user's keys for `rel`; returns bytes written. Idempotent; keeps existing TTLs.

    skip: bool per user row, True for users never to copy (erased on request after the release
    was made: an older release, live again through a rollback or a late refresh, still has them).
    """
    batch = batch or BATCH
    t, rid = rel.tenant, rel.release_id
    written = 0
    ids = rel.user_ids.to_numpy()
    for start in range(0, len(ids), batch):
        pipe = r.pipeline(transaction=False)
        for row in range(start, min(start + batch, len(ids))):  # batching, not per-item math
            if skip is not None and skip[row]:
                continue
            vec = rel.user_vectors[row].astype(np.float32).tobytes()
            seen = rel.seen(row).astype(np.int32).tobytes()
            pipe.set(key(prefix, t, rid, "u", ids[row]), vec, keepttl=True)
            pipe.set(key(prefix, t, rid, "seen", ids[row]), seen, keepttl=True)
            written += len(vec) + len(seen)
        pipe.execute()
    if rel.user_stats is not None:  # the online feature subset, float32 per user (names in meta)
        stats = rel.user_stats.set_index("user_id").reindex(ids)
        vectors = feature_tables.online_user_vectors(stats)
        for start in range(0, len(ids), batch):
            pipe = r.pipeline(transaction=False)
            for row in range(start, min(start + batch, len(ids))):
                if skip is not None and skip[row]:
                    continue
                pipe.set(key(prefix, t, rid, "uf", ids[row]), vectors[row].tobytes(), keepttl=True)
                written += vectors.shape[1] * 4
            pipe.execute()
    popular = rel.popular.astype(np.int32).tobytes()
    r.set(key(prefix, t, rid, "popular"), popular, keepttl=True)
    meta = {"users": len(ids), "dim": rel.user_vectors.shape[1], "scoring": rel.scoring, "complete": 1}
    if rel.user_stats is not None:
        meta["user_features"] = ",".join(feature_tables.ONLINE_USER_FEATURES)
    r.hset(key(prefix, t, rid, "meta"), mapping=meta)
    return written + len(popular)


def flip(
    r, prefix: str, tenant: str, release_id: str, grace_seconds: int, order: int | None = None
) -> tuple[bool, str | None]:
    """(flipped, previous release id): `redis_pointer.flip` for callers that need only that."""
    out = redis_pointer.flip(r, prefix, tenant, release_id, grace_seconds, order)
    return out.flipped, out.previous


def erased_rows(store: ObjectStore, rel: release.Release) -> np.ndarray | None:
    """True for the release's users on the tenant's erasure list (None: nobody was erased)."""
    gone = erased.hashes(store, rel.tenant)
    if not gone:
        return None
    return erased.erased_mask(pd.Series(rel.user_ids.to_numpy(), dtype="string"), gone).to_numpy()


def make_live(
    r, prefix: str, rel: release.Release, order: int, grace_seconds: int, skip: np.ndarray | None = None
) -> tuple[redis_pointer.RedisFlip, int]:
    """Write `rel`'s keys (not those of `skip` users), flip to it at `order`, then PERSIST its
    keys (it is live) or, when a higher order won meanwhile, let them expire. Returns the flip
    and the bytes written."""
    written = write_release(r, prefix, rel, skip=skip)
    out = redis_pointer.flip(r, prefix, rel.tenant, rel.release_id, grace_seconds, order)
    if out.outcome is redis_pointer.RedisFlipOutcome.REFUSED:
        if grace_seconds >= 0:  # -1: no expiry pass (as in flip)
            redis_pointer.expire_release(r, prefix, rel.tenant, rel.release_id, grace_seconds)
    else:
        redis_pointer.persist_release(r, prefix, rel.tenant, rel.release_id, rel.user_ids)
    return out, written


def refresh(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    url = ctx.settings.redis_url
    if not url:
        log.info("refresh: RECSYS_REDIS_URL unset; serving reads the release files (embedded store)")
        return ctx.write_result(STAGE, {"store": "embedded", "flipped": False})
    pointer = release.read_pointer(ctx.store, ctx.tenant)
    if pointer is None:
        raise ctx.error(STAGE, "nothing published yet: no release pointer to refresh from")
    rid, order = pointer[0]["release_id"], generation_of(pointer[0])
    r = redis_client(url)
    prefix = ctx.settings.redis_prefix
    fail = (
        f"[tenant {ctx.tenant}, run {ctx.run_id}, stage {STAGE}] Redis refresh of {rid} failed"
        "{}; the previous release stays live"
    )
    try:
        live_id, live_order = redis_pointer.live(r, prefix, ctx.tenant)
    except Exception as exc:
        raise RefreshFailed(fail.format(f" ({type(exc).__name__}: {exc})")) from exc
    if live_id != rid and live_order >= order:  # a newer refresh or a rollback is already there
        reason = f"Redis is at {live_id} (order {live_order}) >= {rid} (order {order}): stale, not written"
        log.info("refresh: %s", reason)
        return ctx.write_result(
            STAGE, {"store": "redis", "release_id": rid, "flipped": False, "stale": True, "reason": reason}
        )
    rel = release.load_release(ctx.store, ctx.tenant, rid)
    try:
        before = int(r.info("memory")["used_memory"])
        skip = erased_rows(ctx.store, rel)
        out, written = make_live(r, prefix, rel, order, ctx.settings.redis_grace_seconds, skip)
        after = int(r.info("memory")["used_memory"])
    except Exception as exc:  # redis errors: the old release keeps serving; Airflow retries
        raise RefreshFailed(fail.format(f" ({type(exc).__name__}: {exc})")) from exc
    stale = out.outcome is redis_pointer.RedisFlipOutcome.REFUSED
    result = {
        "store": "redis",
        "release_id": rel.release_id,
        "order": order,
        "users": len(rel.user_ids),
        "flipped": out.flipped,
        "stale": stale,
        "previous_release_id": out.previous,
        "payload_bytes": written,
        "redis_memory_delta_bytes": after - before,
    }
    if stale:
        result["reason"] = f"Redis moved to {out.previous} (order {out.previous_order}) meanwhile: not flipped"
    log.info(
        "refresh: %d users of %s in Redis (%.1f MB payload, used_memory %+.1f MB); pointer %s",
        len(rel.user_ids),
        rel.release_id,
        written / 1e6,
        (after - before) / 1e6,
        result.get("reason") or (f"flipped from {out.previous}" if out.flipped else "already current"),
    )
    return ctx.write_result(STAGE, result)
