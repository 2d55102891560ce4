"""What the dashboard knows about tenants, as plain data read from the artifact store.

Every figure comes from files the pipeline already writes (stage `result.json`s, the
validation report, the gate's decision, release manifests, the pointer and the run leases),
so the dashboard needs no database of its own and shows the same numbers as
`python -m pipeline summary`. A stage's `cost` ({cpu_s, wall_s, peak_rss_mb}) is shown when
its result records one. Ages are measured against the wall clock passed in (`now`): this is a
page for people, not a stage.

Status of a tenant's newest run (by data interval), from the store alone: `published` (refresh
wrote its result), `rejected` (the gate said no), `running` (its lease is held and
heartbeating), else `failed` (it stopped before the stage named). Airflow's own state of the
DAG's latest run, when the plugin supplies it, is shown beside it and wins for failed/running.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipeline.config import TenantConfig
from pipeline.stages import STAGES
from pipeline.storage import codecs, paths
from pipeline.storage.base import ObjectStore

COST_FIELDS = ("cpu_s", "wall_s", "peak_rss_mb")
STALE_AFTER_HOURS = 48.0  # newest event or live release older than this: the tenant is stale
RANK = {"failed": 0, "stale": 1, "warning": 2, "running": 3, "ok": 4}  # the fleet's default order


def _json(store: ObjectStore, key: str) -> Any:
    try:
        return codecs.read_json(store.get(key))
    except FileNotFoundError:
        return None


def _hours(now: datetime, stamp: str | None) -> float | None:
    if not stamp:
        return None
    when = datetime.fromisoformat(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=now.tzinfo)
    return (now - when).total_seconds() / 3600


def run_record(store: ObjectStore, tenant: str, run_id: str, keys: set[str], running: set[str]) -> dict[str, Any]:
    """One run: which stages finished, its status, per-stage cost, volume and validation."""
    results = {
        s: _json(store, k)
        for s in STAGES
        if (k := paths.result(s).key(tenant, run_id)) in keys  # only stages that wrote a result
    }
    done = [s for s in STAGES if s in results]
    gate = results.get("gate") or {}
    if "refresh" in results:
        status = "published"
    elif gate and gate.get("publish") is False:
        status = "rejected"
    elif run_id in running:
        status = "running"
    else:
        status = "failed"
    stopped = next((s for s in STAGES if s not in results), None) if status in ("failed", "running") else None
    costs = {s: r["cost"] for s, r in results.items() if isinstance(r, dict) and isinstance(r.get("cost"), dict)}
    total = None
    if costs:
        total = {
            "cpu_s": sum(float(c.get("cpu_s") or 0) for c in costs.values()),
            "wall_s": sum(float(c.get("wall_s") or 0) for c in costs.values()),
            "peak_rss_mb": max(float(c.get("peak_rss_mb") or 0) for c in costs.values()),
        }
    extract, validate = results.get("extract") or {}, results.get("validate") or {}
    return {
        "run_id": run_id,
        "interval_end": paths.interval_end_of(run_id).isoformat(),
        "status": status,
        "stages_done": done,
        "stopped_at": stopped,
        "rows": extract.get("rows"),
        "newest_event": extract.get("max_timestamp"),
        "interval_events": validate.get("interval_events"),
        "validation": None
        if not validate
        else {
            "success": validate.get("success"),
            "warnings": validate.get("warnings", 0),
            "failed": validate.get("failed", 0),
        },
        "cost": costs,
        "cost_total": total,
    }


def _running(store: ObjectStore, tenant: str, now: datetime) -> set[str]:
    from pipeline.ops.maintenance import running_runs

    return running_runs(store, tenant, now.timestamp(), horizon=3600)


def list_runs(store: ObjectStore, tenant: str) -> tuple[list[str], set[str]]:
    """Run ids oldest first, and every key under the tenant's runs (one listing)."""
    keys = store.list(paths.runs_prefix(tenant))
    return paths.run_ids(keys, tenant), set(keys)


def fleet_row(
    store: ObjectStore,
    cfg: TenantConfig,
    now: datetime,
    airflow: dict[str, Any] | None = None,
    stale_after_hours: float = STALE_AFTER_HOURS,
) -> dict[str, Any]:
    """One tenant's line in the fleet view, with its `health` (failed/stale/warning/running/ok)."""
    from pipeline.release import format as release

    t = cfg.tenant
    runs, keys = list_runs(store, t)
    last = run_record(store, t, runs[-1], keys, _running(store, t, now)) if runs else None
    pointer = release.read_pointer(store, t)
    live = pointer[0] if pointer else None
    gate = None
    if decided := paths.runs_with(keys, t, paths.DECISION):
        d = _json(store, paths.DECISION.key(t, decided[-1])) or {}
        gate = {"run_id": decided[-1], "publish": d.get("publish"), "reason": d.get("reason")}
    newest = next((r["newest_event"] for r in [last] if r and r["newest_event"]), None)
    freshness = _hours(now, newest)
    live_age = _hours(now, live["data_interval_end"]) if live else None
    status = last["status"] if last else "never run"
    af_state = (airflow or {}).get("state")
    if af_state in ("failed", "running", "queued"):  # Airflow knows before the store does
        status = "failed" if af_state == "failed" else "running"
    validation = last["validation"] if last else None
    stale = live is None or any(h is not None and h > stale_after_hours for h in (freshness, live_age))
    if status == "failed":
        health = "failed"
    elif stale and status != "running":
        health = "stale"
    elif status == "rejected" or (validation and (validation["warnings"] or not validation["success"])):
        health = "warning"
    else:
        health = "running" if status == "running" else "ok"
    return {
        "tenant": t,
        "dag_id": f"recsys_{t}",
        "health": health,
        "rank": RANK[health],
        "last_run": last,
        "status": status,
        "airflow": airflow,
        "newest_event": newest,
        "freshness_hours": freshness,
        "live": None if live is None else {"release_id": live["release_id"], "pinned": bool(live.get("pinned"))},
        "live_age_hours": live_age,
        "gate": gate,
        "validation": validation,
        "cost": last["cost_total"] if last else None,
    }


def broken_row(tenant: str, error: str) -> dict[str, Any]:
    """A tenant file that does not validate: failed (its DAG fails with the same reason), with why."""
    empty = ("last_run", "airflow", "newest_event", "freshness_hours", "live", "live_age_hours", "gate", "validation")
    row: dict[str, Any] = dict.fromkeys((*empty, "cost"))
    return {**row, "tenant": tenant, "dag_id": f"recsys_{tenant}", "health": "failed", "rank": RANK["failed"],
            "status": "config invalid", "error": error}  # fmt: skip


def fleet(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failures first, then stale tenants, warnings, running, healthy; by name within each."""
    return sorted(rows, key=lambda r: (r["rank"], r["tenant"]))


def tenant_history(store: ObjectStore, tenant: str, now: datetime, limit: int = 60) -> list[dict[str, Any]]:
    """The newest `limit` runs, oldest first: volume, validation, status, stage costs per day."""
    runs, keys = list_runs(store, tenant)
    running = _running(store, tenant, now)
    return [run_record(store, tenant, r, keys, running) for r in runs[-limit:]]
