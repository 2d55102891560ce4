"""Rollback, pin and unpin: a person's explicit moves of the tenant's pointer.

Rollback makes an earlier release live again (the previous one by default) and makes it
stick: the target is loaded as serving loads it and smoke-queried before anything moves; the
pointer moves backwards in one conditional put that also PINS the tenant (pointer.py), and
only from the release rollback read (a publish landing in between wins, nothing rolls back);
the release rolled back from goes on the blocklist, so no rerun or retry of its interval can
make it live again, not even after `unpin`. With Redis configured its keys are (re)written,
PERSISTed and the Redis pointer flipped at the new generation, so serving follows at once.
Then the MLflow alias follows the pointer (alias.py): a registry failure is reported
(`registry: failed`), not raised. Rolling back to the live release moves nothing but still
re-syncs the alias: `rollback TENANT --to <live release>` repairs the registry after MLflow
was unreachable during a publish.

While pinned, publish still writes releases but the pointer stays (`pointer_moved: false`,
the reason names the pin). `unpin` lifts it: the next newer release moves the pointer.
Records: the pointer document (`pinned`, `rollback`), `tenants/{t}/pin.json` while pinned,
`tenants/{t}/blocklist.json` forever. `at` is the wall clock: this is a person's action, not a
stage of a data interval.
A rollback killed after its pointer moved is finished by running the same command again:
the pointer already names the target, and the pin, blocklist and Redis steps are idempotent.
"""

from __future__ import annotations

import getpass
import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings
from pipeline.release import alias, refresh, verify
from pipeline.release import format as release
from pipeline.release import pointer as ptr
from pipeline.release.loaded import Release
from pipeline.storage import ObjectStore, open_store
from pipeline.storage.redis import redis_client

log = logging.getLogger(__name__)


class RollbackError(RuntimeError):
    pass


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in a container: still record something
        return "cli"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def rollback(
    settings: Settings, tenant: str, to: str | None = None, *, reason: str = "", by: str | None = None
) -> dict[str, Any]:
    store = open_store(settings.artifact_root)
    pointer = release.read_pointer(store, tenant)
    if pointer is None:
        raise RollbackError(f"tenant {tenant}: nothing published, nothing to roll back")
    current = pointer[0]["release_id"]
    target = to or pointer[0].get("previous_release_id")
    if not target:
        raise RollbackError(f"tenant {tenant}: live release {current} has no previous release; name one with --to")
    if target == current:
        done = pointer[0].get("rollback")
        if done and pointer[0].get("pinned") and done.get("rolled_back_from"):
            # a rollback that moved the pointer and then died (before its pin record, blocklist
            # entry or Redis): running it again finishes it; every step is idempotent
            servable = verify.load_servable(store, tenant, current)
            redis_out = _finish(settings, store, servable.release, done, pointer[0].get("generation"))
            registry = alias.follow_pointer(settings.mlflow_tracking_uri, store, tenant, current)
            return {
                "tenant": tenant,
                "release_id": current,
                "moved": False,
                "reason": "already live; the rollback to it is recorded and complete",
                "pinned": True,
                "blocklisted": done["rolled_back_from"],
                **redis_out,
                **registry,
            }
        registry = alias.sync_registry(settings.mlflow_tracking_uri, store, tenant, current)
        return {"tenant": tenant, "release_id": current, "moved": False, "reason": "already live", **registry}
    blocked = ptr.read_blocklist(store, tenant).get(target)
    if blocked is not None:
        raise RollbackError(
            f"tenant {tenant}: release {target} is blocklisted ({blocked.get('reason')}); remove it from "
            f"tenants/{tenant}/blocklist.json first if it really should be live again"
        )
    try:
        servable = verify.load_servable(store, tenant, target)  # refuses a missing or corrupt release
        verify.smoke_query(servable)
    except FileNotFoundError as exc:
        raise RollbackError(f"tenant {tenant}: release {target} is incomplete: {exc}") from None
    rel = servable.release
    who, at = _who(by), _now()
    why = reason or f"rollback from {current}"
    record = {"kind": "rollback", "reason": why, "by": who, "at": at, "rolled_back_from": current}
    flip = release.flip_pointer(
        store,
        tenant,
        release.Pointer(
            target,
            rel.manifest["data_interval_end"],
            extra={"rolled_back_from": current, "model": rel.manifest.get("model"), "rollback": record},
            pinned={**record, "release_id": target},
        ),
        allow_backwards=True,
        expect_release=current,
    )
    if flip.outcome is release.FlipOutcome.LOST_RACE:  # never retried: it would undo a publish just made
        raise RollbackError(
            f"tenant {tenant}: {flip.reason}; nothing rolled back: check the live release and run it again"
        )
    if not flip.moved:
        raise RollbackError(f"tenant {tenant}: pointer not moved: {flip.reason}")
    redis_out = _finish(settings, store, rel, record, flip.generation)
    log.warning("rollback tenant=%s: %s -> %s (pinned; %s blocklisted) by %s", tenant, current, target, current, who)
    registry = alias.follow_pointer(settings.mlflow_tracking_uri, store, tenant, target)
    return {
        "tenant": tenant,
        "release_id": target,
        "previous_release_id": current,
        "moved": True,
        "pinned": True,
        "blocklisted": current,
        "generation": flip.generation,
        **redis_out,
        **registry,
    }


def _finish(settings: Settings, store: ObjectStore, rel: Release, record: dict[str, Any], generation: Any) -> dict:
    """After the pointer moved back: the pin record, the blocklist entry, then Redis (idempotent)."""
    tenant, target, bad = rel.tenant, rel.release_id, record["rolled_back_from"]
    ptr.write_pin_record(store, tenant, {**record, "release_id": target}, rel.manifest["data_interval_end"])
    entry = {k: record.get(k) for k in ("reason", "by", "at")}
    ptr.add_to_blocklist(store, tenant, bad, {**entry, "rolled_back_to": target, "generation": generation})
    return _finish_redis(settings, store, rel, generation)


def _finish_redis(settings: Settings, store: ObjectStore, rel: Release, generation: Any) -> dict:
    """The release's Redis keys written and PERSISTed, then the Redis pointer at `generation` (rollback, promote)."""
    if not settings.redis_url:
        return {}
    client = redis_client(settings.redis_url)
    assert generation is not None
    skip = refresh.erased_rows(store, rel)  # users erased since: never copied back into Redis
    out, _ = refresh.make_live(client, settings.redis_prefix, rel, generation, settings.redis_grace_seconds, skip)
    return {"redis_flipped": out.flipped, "redis_outcome": out.outcome.name.lower()}


def pin(settings: Settings, tenant: str, *, reason: str = "", by: str | None = None) -> dict[str, Any]:
    """Hold the tenant at its live release: publishes write releases but move nothing until unpin."""
    store = open_store(settings.artifact_root)
    record = {"kind": "pin", "reason": reason or "pinned by hand", "by": _who(by), "at": _now()}
    try:
        doc = ptr.set_pin(store, tenant, record)
    except ptr.PreconditionFailed as exc:
        raise RollbackError(str(exc)) from None
    log.warning("pin tenant=%s at %s by %s", tenant, doc["release_id"], record["by"])
    return {"tenant": tenant, "pinned": True, "release_id": doc["release_id"], **record}


def unpin(settings: Settings, tenant: str, *, by: str | None = None) -> dict[str, Any]:
    """Lift the pin: the next newer, non-blocklisted release moves the pointer again."""
    store = open_store(settings.artifact_root)
    was = ptr.read_pin(store, tenant)
    if release.read_pointer(store, tenant) is None:
        raise RollbackError(f"tenant {tenant}: nothing published, nothing to unpin")
    doc = ptr.set_pin(store, tenant, None)
    log.warning("unpin tenant=%s (was %s) by %s", tenant, was, _who(by))
    return {"tenant": tenant, "pinned": False, "release_id": doc["release_id"], "was": was, "by": _who(by)}
