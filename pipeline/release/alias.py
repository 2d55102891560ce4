"""The MLflow registry alias `champion` follows the release pointer, never leads it.

Publish and rollback move the store pointer first, then call here. Two writers can interleave
(a publish registering its release while a rollback moves the pointer), so the alias is set,
then the pointer re-read: if it moved meanwhile, the alias is set again to what is live now.
Whoever sets the alias last has checked the pointer after doing so.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.ops import tracking
from pipeline.release import format as release
from pipeline.storage import ObjectStore, codecs, paths

log = logging.getLogger(__name__)
ATTEMPTS = 3


def fit_run_id(store: ObjectStore, tenant: str, manifest: dict[str, Any]) -> str | None:
    """The MLflow run that fitted the release's weights, while its run folder is retained."""
    run = manifest.get("run_id")
    for artifact in (paths.REFIT_RESULT, paths.TRAIN_RESULT):
        key = artifact.key(tenant, run) if run else None
        if key and store.exists(key):
            run_id = codecs.read_json(store.get(key)).get("mlflow_run_id")
            if run_id:
                return run_id
    return None


def sync_registry(
    tracking_uri: str, store: ObjectStore, tenant: str, release_id: str, run_id: str | None = None
) -> dict[str, Any]:
    """Point `champion` at `release_id`'s model version (created if missing). Never raises:
    returns the registry fields of a result, `registry: failed` on any error."""
    try:
        manifest = release.read_manifest(store, tenant, release_id)
        return tracking.register_release(
            tracking_uri,
            tenant,
            release_id,
            store.uri(paths.release_prefix(tenant, release_id)),
            manifest,
            run_id or fit_run_id(store, tenant, manifest),
            champion=True,
        )
    except Exception as exc:  # noqa: BLE001 - the pointer already moved; report, don't undo
        log.error(
            "registry: could not move alias %s to release %s/%s: %s", tracking.CHAMPION_ALIAS, tenant, release_id, exc
        )
        return {"registry": "failed", "registry_error": f"{type(exc).__name__}: {exc}"[:1000]}


def follow_pointer(
    tracking_uri: str, store: ObjectStore, tenant: str, release_id: str, run_id: str | None = None
) -> dict[str, Any]:
    """Sync the alias to `release_id` (live when the caller moved the pointer to it), then re-read
    the pointer and re-sync to whatever is live if it moved meanwhile. The fields returned are
    those of the first sync (what this caller registered); `alias_release_id` says where the
    alias was left."""
    out = sync_registry(tracking_uri, store, tenant, release_id, run_id)
    target = release_id
    for _ in range(ATTEMPTS):
        got = release.read_pointer(store, tenant)
        live = got[0]["release_id"] if got else None
        if live is None or live == target or out.get("registry") == "failed":
            break
        log.warning(
            "registry: pointer of %s moved to %s while the alias was set to %s; following", tenant, live, target
        )
        target = live
        sync_registry(tracking_uri, store, tenant, live)
    return {**out, "alias_release_id": target}
