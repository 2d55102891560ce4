"""Retention and the cross-tenant data-quality summary (the maintenance DAG's work).

Retention keeps each tenant's newest `retention.runs` run folders and newest
`retention.releases` releases, and always the live release and the one before it (the
rollback target). Redis keys of releases that are no longer live get an expiry instead of
an immediate delete, so a reader mid-request is never cut off.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.config import Settings, TenantConfig
from pipeline.release import format as release
from pipeline.storage import ObjectStore, codecs, paths
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


def apply_retention(
    store: ObjectStore, cfg: TenantConfig, redis=None, prefix: str = "recsys", grace_seconds: int = 86_400
) -> dict[str, Any]:
    t = cfg.tenant
    runs = _children(store, paths.runs_prefix(t).rstrip("/"))
    drop_runs = sorted(runs)[: max(0, len(runs) - cfg.retention.runs)]
    releases = _children(store, paths.releases_prefix(t))
    complete = sorted(r for r, keys in releases.items() if any(k.endswith("/" + release.MANIFEST) for k in keys))
    pointer = release.read_pointer(store, t)
    protected = set(complete[-cfg.retention.releases :])
    if pointer is not None:
        protected |= {pointer[0]["release_id"], pointer[0].get("previous_release_id") or ""}
    newest = complete[-1] if complete else ""
    # half-written releases (no manifest) are failed publishes once a newer release exists
    drop_releases = [r for r in releases if r not in protected and (r in complete or r < newest)]
    for name in drop_runs:
        for k in runs[name]:
            store.delete(k)
    for name in drop_releases:
        for k in releases[name]:
            store.delete(k)
    expired = 0
    if redis is not None and pointer is not None:
        live = pointer[0]["release_id"]
        for meta in redis.scan_iter(match=redis_key(prefix, t, "*", "meta"), count=1000):
            rid = meta.decode().split(":")[-2]
            if rid != live and redis.ttl(meta) == -1:
                for k in redis.scan_iter(match=redis_key(prefix, t, rid, "*"), count=1000):
                    redis.expire(k, max(grace_seconds, 1))
                expired += 1
    result = {
        "tenant": t,
        "runs_deleted": len(drop_runs),
        "runs_kept": len(runs) - len(drop_runs),
        "releases_deleted": len(drop_releases),
        "redis_releases_expiring": expired,
    }
    log.info("retention tenant=%s: %s", t, result)
    return result


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
    from pipeline.config import TenantConfigError, load_tenant_file, tenant_files

    out = []
    for path in tenant_files(settings.tenants_dir):
        try:
            out.append(load_tenant_file(path, expect_name_match=True))
        except TenantConfigError as exc:
            log.warning("skipping %s", exc)
    return out
