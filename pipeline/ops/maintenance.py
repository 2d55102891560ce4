"""Retention and the cross-tenant data-quality summary (the maintenance DAG's work).

Retention keeps each tenant's newest `retention.runs` run folders and newest
`retention.releases` releases, and always what is live in any store (`live_releases`: the
store pointer's release, previous and rolled-back-from ones, the pinned release, the Redis
pointer's release) and what a run in progress needs (a run holding its lease keeps its run
folder and the release it may be uploading). Redis keys of releases that are not live get an
expiry instead of an immediate delete, so a reader mid-request is never cut off.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from pipeline.config import Settings, TenantConfig
from pipeline.release import format as release
from pipeline.storage import ObjectStore, codecs, paths
from pipeline.storage import lease as leases
from pipeline.storage.redis import key as redis_key

log = logging.getLogger(__name__)


def blocking_failures(report: dict[str, Any]) -> list[str]:
    """What stopped a run (warnings are listed apart); older reports only have `expectations`."""
    if "failures" in report:
        return list(report["failures"])
    return [
        e["expectation"] + (f" on {e['column']}" if e.get("column") else "")
        for e in report.get("expectations", [])
        if not e["success"]
    ]


def _children(store: ObjectStore, prefix: str) -> dict[str, list[str]]:
    """{child folder name: [keys]} directly below `prefix/`."""
    out: dict[str, list[str]] = {}
    for k in store.list(prefix + "/"):
        out.setdefault(k[len(prefix) + 1 :].split("/", 1)[0], []).append(k)
    return out


RELEASE_ID = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]+$")  # <run>-<digest>: release_id_for
# An Airflow run sends no heartbeat while its next task waits in a queue: retention treats an
# unreleased lease as a run in progress for this long (a lease's TTL only decides takeovers).
RUNNING_HORIZON_SECONDS = 2 * 86_400


def live_releases(store: ObjectStore, tenant: str, redis: Any = None, prefix: str = "recsys") -> dict[str, str]:
    """Every release something serves or may roll back to, by role: the store pointer's release
    ("pointer"), its "previous" one and the one it was "rolled_back_from", the "pinned" release
    (a rollback's pin) and the release the "redis" pointer names (which leads or lags the store
    pointer around a refresh or a rollback)."""
    live: dict[str, str] = {}
    pointer = release.read_pointer(store, tenant)
    if pointer is not None:
        for role, field in (("pointer", "release_id"), ("previous", "previous_release_id")):
            live[role] = pointer[0].get(field) or ""
        live["rolled_back_from"] = pointer[0].get("rolled_back_from") or ""
    if store.exists(paths.pin_key(tenant)):
        live["pinned"] = codecs.read_json(store.get(paths.pin_key(tenant))).get("release_id") or ""
    if redis is not None:
        current = redis.get(redis_key(prefix, tenant, "current"))
        live["redis"] = current.decode() if current else ""
    return {role: rid for role, rid in live.items() if rid}


SERVED = ("pointer", "pinned", "redis")  # roles whose Redis keys must never expire


def running_runs(store: ObjectStore, tenant: str, now: float, horizon: float = RUNNING_HORIZON_SECONDS) -> set[str]:
    """Runs whose lease is held (not released, heartbeat within `horizon`): a run in progress."""
    out = set()
    for k in store.list(paths.leases_prefix(tenant)):
        run_id = k[len(paths.leases_prefix(tenant)) :].removesuffix(".json")
        doc = leases.read(store, tenant, run_id)
        if doc is not None and leases.live(doc[0], now, horizon):
            out.add(run_id)
    return out


def apply_retention(
    store: ObjectStore,
    cfg: TenantConfig,
    redis: Any = None,
    prefix: str = "recsys",
    grace_seconds: int = 86_400,
    now: float | None = None,
) -> dict[str, Any]:
    """Delete old run folders and releases, and give Redis keys of non-live releases a TTL.

    Never touches what a run in progress needs (its run folder, its release being uploaded,
    its Redis keys being written before the flip) nor a live release (`live_releases`)."""
    t = cfg.tenant
    now = time.time() if now is None else now
    running = running_runs(store, t, now)
    runs = _children(store, paths.runs_prefix(t).rstrip("/"))
    idle = sorted(r for r in runs if r not in running)
    newest_runs = set(sorted(runs)[-cfg.retention.runs :]) if cfg.retention.runs > 0 else set()
    drop_runs = [r for r in idle if r not in newest_runs]
    releases = _children(store, paths.releases_prefix(t))
    complete = sorted(r for r, keys in releases.items() if any(k.endswith("/" + release.MANIFEST) for k in keys))
    roles = live_releases(store, t, redis, prefix)
    live = set(roles.values())
    protected = set(complete[-cfg.retention.releases :]) | live
    protected |= {r for r in releases if (m := RELEASE_ID.match(r)) and m.group(1) in running}
    newest = complete[-1] if complete else ""
    # a manifest-less release no running run is writing is a failed publish once a newer release exists
    drop_releases = [r for r in releases if r not in protected and (r in complete or r < newest)]
    for name in drop_runs:
        for k in runs[name]:
            store.delete(k)
        store.delete(paths.lease_key(t, name))  # a zombie of that run now fails at its next write
    for name in drop_releases:
        for k in releases[name]:
            store.delete(k)
    served = {rid for role, rid in roles.items() if role in SERVED}
    expired = _expire_redis(redis, prefix, t, live, served, running, grace_seconds) if redis is not None else 0
    result = {
        "tenant": t,
        "runs_deleted": len(drop_runs),
        "runs_kept": len(runs) - len(drop_runs),
        "runs_in_progress": sorted(running),
        "releases_deleted": len(drop_releases),
        "live_releases": roles,
        "redis_releases_expiring": expired,
    }
    log.info("retention tenant=%s: %s", t, result)
    return result


def _expire_redis(
    redis: Any, prefix: str, tenant: str, live: set[str], served: set[str], running: set[str], grace: int
) -> int:
    """One pass over the tenant's keys: every key of a release that is not live and not being
    written by a running run gets a TTL (EXPIRE NX: an existing TTL is left alone), whether its
    meta says complete or not (a refresh that never finished); keys of a served release lose any
    TTL (PERSIST: a pass that raced its refresh, or a rollback to a replaced release, must not
    leave it expiring); the other live ones (previous, rolled back from) are left as they are.
    Returns how many releases got a TTL now."""
    head = redis_key(prefix, tenant, "")
    touched: set[str] = set()
    batch: list[tuple[str, bytes]] = []

    def flush() -> None:
        pipe = redis.pipeline(transaction=False)
        for action, k in batch:
            if action == "persist":
                pipe.persist(k)
            else:
                pipe.expire(k, max(grace, 1), nx=True)
        for (action, k), changed in zip(batch, pipe.execute(), strict=True):
            if action == "expire" and changed:
                touched.add(k.decode()[len(head) :].split(":", 1)[0])
        batch.clear()

    for k in redis.scan_iter(match=head + "*", count=1000):
        rid = k.decode()[len(head) :].split(":", 1)[0]
        m = RELEASE_ID.match(rid)
        if m is None or m.group(1) in running or (rid in live and rid not in served):
            continue  # the pointer (and any tenant-level key), a refresh still writing, a rollback target
        batch.append(("persist" if rid in served else "expire", k))
        if len(batch) >= 1000:
            flush()
    if batch:
        flush()
    return len(touched)


def quality_summary(store: ObjectStore, configs: list[TenantConfig], day: str) -> dict[str, Any]:
    """The latest validation result of every tenant, as one JSON report for `day`."""
    tenants: dict[str, Any] = {}
    for cfg in configs:
        runs = sorted(_children(store, paths.runs_prefix(cfg.tenant).rstrip("/")))
        report = None
        for run_id in reversed(runs):
            key = paths.VALIDATION_REPORT.key(cfg.tenant, run_id)
            if store.exists(key):
                report = codecs.read_json(store.get(key))
                break
        if report is None:
            tenants[cfg.tenant] = {"status": "no validation yet"}
            continue
        failed = blocking_failures(report)
        tenants[cfg.tenant] = {
            "status": "pass" if report["success"] else "FAIL",
            "run_id": report["run_id"],
            "rows": report["rows"],
            "duplicate_rows": report["duplicate_rows"],
            "failed": failed,
            "warnings": report.get("warnings", []),
            "data_docs": report.get("data_docs"),
        }
    key = f"reports/data_quality/{day}.json"
    store.put(key, codecs.json_bytes({"day": day, "tenants": tenants}))
    width = max([len(t) for t in tenants] + [6])
    lines = [f"{'tenant':<{width}}  status  rows        failed"] + [
        f"{t:<{width}}  {v['status'] if v['status'] in ('pass', 'FAIL') else '-':<6}  {v.get('rows', ''):<10}  "
        f"{', '.join(v.get('failed', [])) or ''}"
        for t, v in sorted(tenants.items())
    ]
    log.info("data quality %s:\n%s", day, "\n".join(lines))
    return {
        "uri": store.uri(key),
        "tenants": len(tenants),
        "failing": sorted(t for t, v in tenants.items() if v["status"] == "FAIL"),
    }


def valid_configs(settings: Settings) -> list[TenantConfig]:
    return load_configs(settings)[0]


def load_configs(settings: Settings) -> tuple[list[TenantConfig], dict[str, str]]:
    """The tenant files that validate, and {file stem: why not} for those that do not."""
    from pipeline.config import TenantConfigError, load_tenant_file, tenant_files

    out, broken = [], {}
    for path in tenant_files(settings.tenants_dir):
        try:
            out.append(load_tenant_file(path, expect_name_match=True))
        except TenantConfigError as exc:
            log.warning("skipping %s", exc)
            broken[path.stem] = str(exc)
    return out, broken
