"""Rollback: make an earlier release live again (the previous one by default).

The target is verified (every checksum) before the pointer moves; with Redis configured its
keys are rewritten and the Redis pointer flipped too, so serving follows at once.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import refresh, release
from pipeline.config import Settings
from pipeline.storage import open_store

log = logging.getLogger(__name__)


class RollbackError(RuntimeError):
    pass


def rollback(settings: Settings, tenant: str, to: str | None = None) -> dict[str, Any]:
    store = open_store(settings.artifact_root)
    pointer = release.read_pointer(store, tenant)
    if pointer is None:
        raise RollbackError(f"tenant {tenant}: nothing published, nothing to roll back")
    current = pointer[0]["release_id"]
    target = to or pointer[0].get("previous_release_id")
    if not target:
        raise RollbackError(f"tenant {tenant}: live release {current} has no previous release; name one with --to")
    if target == current:
        return {"tenant": tenant, "release_id": current, "moved": False, "reason": "already live"}
    try:
        rel = release.load_release(store, tenant, target)  # refuses a missing or corrupt release
    except FileNotFoundError as exc:
        raise RollbackError(f"tenant {tenant}: release {target} is incomplete: {exc}") from None
    moved, reason = release.try_flip(
        store,
        tenant,
        release.Pointer(
            target,
            rel.manifest["data_interval_end"],
            extra={"rolled_back_from": current, "model": rel.manifest.get("model")},
        ),
        allow_backwards=True,
    )
    if not moved:
        raise RollbackError(f"tenant {tenant}: pointer not moved: {reason}")
    if settings.redis_url:
        client = refresh.redis_client(settings.redis_url)
        refresh.write_release(client, settings.redis_prefix, rel)
        refresh.flip(client, settings.redis_prefix, tenant, target, settings.redis_grace_seconds)
    log.warning("rollback tenant=%s: %s -> %s", tenant, current, target)
    return {"tenant": tenant, "release_id": target, "previous_release_id": current, "moved": True}
