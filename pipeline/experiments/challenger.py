"""Challengers: a release the gate accepted, published WITHOUT moving the pointer, served to a
share of users by an experiment until a person promotes it (promote.py) or a newer one replaces it.

`tenants/{t}/challenger.json` names it ({release_id, data_interval_end, run_id, share,
replaced}); serving reads it to know what the `challenger` arms serve. The release itself is
written and verified exactly as publish does before a flip (same files, same checks), so a
promotion later only moves the pointer. The record moves by conditional put, never backwards
in data interval (a retry or a backfill cannot replace a newer challenger).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.release import format as release
from pipeline.release.pointer import interval_instant, read_blocklist
from pipeline.storage import ObjectStore, PreconditionFailed, codecs, paths


def read_challenger(store: ObjectStore, tenant: str) -> dict[str, Any] | None:
    got = store.get_with_etag(paths.challenger_key(tenant))
    return json.loads(got[0]) if got else None


def publish_challenger(
    store: ObjectStore, tenant: str, files: dict[str, bytes], manifest: dict[str, Any], share: float
) -> dict[str, Any]:
    """Write and verify the release, then record it as the tenant's challenger; the pointer stays."""
    from pipeline.release import verify  # imports release.format: a call-time import, as publish_release does

    release_id = release.release_id_for(manifest["run_id"], files)
    written = release.write_release(store, tenant, release_id, files, manifest)
    blocked = read_blocklist(store, tenant).get(release_id)
    if blocked is not None:
        return {"release_id": release_id, "written": written, "challenger": False, "reason": "blocklisted"}
    checks = verify.verify_release(store, tenant, release_id, files)
    key = paths.challenger_key(tenant)
    new_end = interval_instant(manifest["data_interval_end"])
    got = store.get_with_etag(key)
    old = json.loads(got[0]) if got else None
    if old is not None and old["release_id"] == release_id:
        return {"release_id": release_id, "written": written, "challenger": True, "reason": "already the challenger"}
    if old is not None and interval_instant(old["data_interval_end"]) >= new_end:
        return {
            "release_id": release_id,
            "written": written,
            "challenger": False,
            "reason": f"challenger {old['release_id']} covers data up to {old['data_interval_end']}: kept",
        }
    doc = {
        "release_id": release_id,
        "data_interval_end": manifest["data_interval_end"],
        "run_id": manifest["run_id"],
        "share": share,
        "replaced": old["release_id"] if old else None,
    }
    try:
        store.put_if(key, codecs.json_bytes(doc), etag=got[1] if got else None)
    except PreconditionFailed:
        return {"release_id": release_id, "written": written, "challenger": False, "reason": "lost a race: rerun"}
    return {"release_id": release_id, "written": written, "challenger": True, "reason": "challenger", **checks}


def clear_challenger(store: ObjectStore, tenant: str, release_id: str) -> bool:
    """Forget the challenger record if it still names `release_id` (after its promotion)."""
    got = store.get_with_etag(paths.challenger_key(tenant))
    if got is None or json.loads(got[0]).get("release_id") != release_id:
        return False
    store.delete(paths.challenger_key(tenant))
    return True
