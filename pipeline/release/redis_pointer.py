"""The tenant's Redis pointer: ordered flips, and the TTLs of the releases it moves between.

Shared by the refresh stage and rollback (neither imports the other's logic). The order
is the store pointer's generation (pipeline/release/pointer.py); FLIP_SCRIPT compares it
atomically in Redis.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.storage.redis import EXPIRE_UNLESS_LIVE_SCRIPT, FLIP_SCRIPT, key

BATCH = 2_000
# what refresh writes per release (serving's fold-in keys fu:/fseen: keep their own TTL)
USER_KINDS = ("u", "seen", "uf")
RELEASE_KEYS = ("popular", "meta")


class RedisFlipOutcome(enum.Enum):
    FLIPPED = 1
    ALREADY_CURRENT = 0
    REFUSED = -1  # Redis holds an equal or higher order (a newer release or a rollback)


@dataclass(frozen=True)
class RedisFlip:
    outcome: RedisFlipOutcome
    previous: str | None  # the release id Redis pointed at before
    previous_order: int  # -1: none recorded

    @property
    def flipped(self) -> bool:
        return self.outcome is RedisFlipOutcome.FLIPPED


def pointer_keys(prefix: str, tenant: str) -> list[str]:
    return [key(prefix, tenant, "current"), key(prefix, tenant, "current_order")]


def live(r: Any, prefix: str, tenant: str) -> tuple[str | None, int]:
    """(release id, order) of the Redis pointer; (None, -1) when unset."""
    cur, order = r.mget(pointer_keys(prefix, tenant))
    return (cur.decode() if cur else None), (int(order) if order is not None else -1)


def flip(r: Any, prefix: str, tenant: str, release_id: str, grace_seconds: int, order: int | None = None) -> RedisFlip:
    """Point the tenant at release_id if its meta says complete and `order` is above Redis's.

    order None is an unordered flip (tools, tests, benchmarks): a compare-and-set against the
    value read, which clears the recorded order. The replaced release's keys expire after
    grace_seconds (-1: no expiry pass), never while it is live again.
    """
    if r.hget(key(prefix, tenant, release_id, "meta"), "complete") != b"1":
        raise RuntimeError(f"refusing to flip {tenant} to {release_id}: its Redis keys are incomplete")
    script = r.register_script(FLIP_SCRIPT)
    keys = pointer_keys(prefix, tenant)
    while True:
        if order is None:
            cur = r.get(keys[0])
            seen = cur.decode() if cur else ""
            if seen == release_id:
                return RedisFlip(RedisFlipOutcome.ALREADY_CURRENT, seen, live(r, prefix, tenant)[1])
            code, old, have = script(keys=keys, args=[release_id, "", seen])
            if int(code) == -1:
                continue  # someone flipped in between: re-read and retry
        else:
            code, old, have = script(keys=keys, args=[release_id, str(order), ""])
        break
    out = RedisFlip(RedisFlipOutcome(int(code)), old.decode() or None, int(have))
    if out.flipped and out.previous and grace_seconds >= 0:
        expire_release(r, prefix, tenant, out.previous, grace_seconds)
    return out


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def expire_release(r: Any, prefix: str, tenant: str, release_id: str, seconds: int) -> int:
    """Give every key of a release a TTL, batch by batch, each batch skipped if the release is
    live at that instant (atomic in Redis: a rollback that made it live again wins)."""
    script = r.register_script(EXPIRE_UNLESS_LIVE_SCRIPT)
    current = key(prefix, tenant, "current")
    n = 0
    for batch in _batches(r.scan_iter(match=key(prefix, tenant, release_id, "*"), count=1000), 1000):
        n += int(script(keys=[current, *batch], args=[release_id, max(seconds, 1)]))
    return n


def persist_release(r: Any, prefix: str, tenant: str, release_id: str, user_ids: Iterable[str]) -> None:
    """Remove the TTL of every key refresh writes for a live release (user keys, popular, meta)."""
    pipe = r.pipeline(transaction=False)
    for name in RELEASE_KEYS:
        pipe.persist(key(prefix, tenant, release_id, name))
    pipe.execute()
    for batch in _batches((str(u) for u in user_ids), BATCH):
        pipe = r.pipeline(transaction=False)
        for user in batch:  # batching, not per-item math
            for kind in USER_KINDS:
                pipe.persist(key(prefix, tenant, release_id, kind, user))
        pipe.execute()
