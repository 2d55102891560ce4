"""Rollback: make an earlier release live again (the previous one by default).

The target is verified (every checksum) before the pointer moves; with Redis configured its
keys are rewritten and the Redis pointer flipped too, so serving follows at once. Then the
MLflow registry follows: the `champion` alias moves to the target's model version, which is
created when the release predates the registry (or was never live, e.g. a backfill).

The pointer is what serving reads, so it moves first; a registry failure afterwards is
reported (`registry: failed`), not raised. Rolling back to the release that is already live
moves nothing but still re-syncs the alias: `rollback TENANT --to <live release>` is how to
repair the registry after MLflow was unreachable during a publish.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Settings
from pipeline.ops import tracking
from pipeline.release import format as release
from pipeline.release import refresh
from pipeline.storage import ObjectStore, codecs, open_store, paths
from pipeline.storage.redis import redis_client

log = logging.getLogger(__name__)


class RollbackError(RuntimeError):
    pass


def _fit_run_id(store: ObjectStore, tenant: str, manifest: dict[str, Any]) -> str | None:
    """The MLflow run that fitted the release's weights, while its run folder is retained."""
    run = manifest.get("run_id")
    for artifact in (paths.REFIT_RESULT, paths.TRAIN_RESULT):
        key = artifact.key(tenant, run) if run else None
        if key and store.exists(key):
            run_id = codecs.read_json(store.get(key)).get("mlflow_run_id")
            if run_id:
                return run_id
    return None


def sync_registry(settings: Settings, store: ObjectStore, tenant: str, release_id: str) -> dict[str, Any]:
    """Point the `champion` alias at `release_id`'s model version (created if missing).

    Never raises: returns the registry fields of a result, `registry: failed` on any error.
    """
    try:
        manifest = release.read_manifest(store, tenant, release_id)
        return tracking.register_release(
            settings.mlflow_tracking_uri,
            tenant,
            release_id,
            store.uri(paths.release_prefix(tenant, release_id)),
            manifest,
            _fit_run_id(store, tenant, manifest),
            champion=True,
        )
    except Exception as exc:  # noqa: BLE001 - the pointer already moved; report, don't undo
        log.error(
            "registry: could not move alias %s to release %s/%s: %s", tracking.CHAMPION_ALIAS, tenant, release_id, exc
        )
        return {"registry": "failed", "registry_error": f"{type(exc).__name__}: {exc}"[:1000]}


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
        registry = sync_registry(settings, store, tenant, current)
        return {"tenant": tenant, "release_id": current, "moved": False, "reason": "already live", **registry}
    try:
        rel = release.load_release(store, tenant, target)  # refuses a missing or corrupt release
    except FileNotFoundError as exc:
        raise RollbackError(f"tenant {tenant}: release {target} is incomplete: {exc}") from None
    flip = release.flip_pointer(
        store,
        tenant,
        release.Pointer(
            target,
            rel.manifest["data_interval_end"],
            extra={"rolled_back_from": current, "model": rel.manifest.get("model")},
        ),
        allow_backwards=True,
    )
    if flip.outcome is release.FlipOutcome.LOST_RACE:  # never retried: it would undo a publish just made
        raise RollbackError(
            f"tenant {tenant}: {flip.reason}; nothing rolled back: check the live release and run it again"
        )
    if not flip.moved:
        raise RollbackError(f"tenant {tenant}: pointer not moved: {flip.reason}")
    if settings.redis_url:
        client = redis_client(settings.redis_url)
        refresh.write_release(client, settings.redis_prefix, rel)
        refresh.flip(client, settings.redis_prefix, tenant, target, settings.redis_grace_seconds)
    log.warning("rollback tenant=%s: %s -> %s", tenant, current, target)
    registry = sync_registry(settings, store, tenant, target)
    return {"tenant": tenant, "release_id": target, "previous_release_id": current, "moved": True, **registry}
